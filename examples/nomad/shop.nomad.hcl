# fcgi-engine under Nomad: one allocation per host, nginx (or any load balancer) finds the
# healthy ones through Consul (the service below) and its check on /readyz.
#
# Stopping an allocation: Nomad deregisters the service, waits shutdown_delay (the load balancer
# learns), then sends kill_signal; fcgi-engine then waits drain_delay more (belt and braces:
# /readyz is 503 from the first second), stops accepting, serves what is queued and finishes
# in-flight requests within graceful_timeout. kill_timeout covers drain_delay + graceful_timeout.
job "shop" {
  datacenters = ["dc1"]
  type        = "service"

  update {
    max_parallel     = 1        # host by host, as `serial: 1` does in Ansible
    health_check     = "checks" # healthy = the /readyz check passes
    min_healthy_time = "10s"
    healthy_deadline = "2m"
    auto_revert      = true     # a release that never gets ready is rolled back
    canary           = 1
    auto_promote     = false    # promote the canary by hand: `nomad job promote shop`
  }

  group "app" {
    count = 3

    network {
      port "fcgi" { static = 9000 }
      port "status" { static = 9100 }
    }

    service {
      name = "shop-fcgi"
      port = "fcgi"
      check {
        name     = "ready"
        type     = "http"
        port     = "status"
        path     = "/readyz"
        interval = "2s"
        timeout  = "1s"
      }
      check {
        name     = "live"
        type     = "http"
        port     = "status"
        path     = "/livez"
        interval = "10s"
        timeout  = "2s"
        check_restart {
          limit = 3
          grace = "30s"
        }
      }
    }

    task "fcgi-engine" {
      driver = "exec"

      config {
        command = "/opt/shop/venv/bin/fcgi-engine"
        args    = ["-c", "local/fcgi-engine.yml", "run", "shop"]
      }

      kill_signal    = "SIGTERM"
      shutdown_delay = "5s"  # after deregistration, before the signal
      kill_timeout   = "45s" # drain_delay 10 + graceful_timeout 30 + margin

      template {
        destination = "local/fcgi-engine.yml"
        data        = <<-YAML
          servers:
            - name: shop
              app: "shop.wsgi:application"
              chdir: /opt/shop/current
              socket: "{{ env "NOMAD_IP_fcgi" }}:{{ env "NOMAD_PORT_fcgi" }}"
              status_listen: "{{ env "NOMAD_IP_status" }}:{{ env "NOMAD_PORT_status" }}"
              pidfile: "{{ env "NOMAD_TASK_DIR" }}/shop.pid"
              allowed_addrs: [10.0.0.0/16]   # the load balancers' network
              nproc: 4
              health: /healthz
              drain_delay: 10
              graceful_timeout: 30
              error_log: "-"
          YAML
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
