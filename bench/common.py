"""What the benchmarks share: one nginx in front of the backend under test, with
`/off` (fastcgi_keep_conn off) and `/on` (an upstream keepalive pool) locations."""

NGINX = """
daemon off; worker_processes 1; {user} pid {d}/nginx.pid; error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off;
  client_body_temp_path {d}/b; fastcgi_temp_path {d}/f; proxy_temp_path {d}/p;
  uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  upstream off {{ server unix:{sock}; }}
  upstream on {{ server unix:{sock}; keepalive 32; }}
  server {{ listen 127.0.0.1:{port};
    location /off {{ include /etc/nginx/fastcgi_params; fastcgi_pass off; }}
    location /on {{ include /etc/nginx/fastcgi_params; fastcgi_pass on; fastcgi_keep_conn on; }}
  }}
}}
"""
