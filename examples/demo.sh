#!/usr/bin/env bash
# The demo: install, serve a Python app and a Perl FastCGI program behind nginx, roll both out
# under load (the app takes a second to boot), show that no request failed, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EX=$ROOT/examples

if ! command -v nginx >/dev/null 2>&1 || ! perl -MFCGI -e1 2>/dev/null; then
  echo "== installing nginx and Perl's FCGI (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libfcgi-perl >/dev/null
fi
if ! python3 -c "import fcgi_engine" 2>/dev/null; then
  echo "== installing fcgi-engine (pip install -e .)"
  python3 -m pip install -q --disable-pip-version-check -e .
fi
FE="python3 -m fcgi_engine -c $EX/fcgi-engine.yml"

# A deploy layout: releases/N and a `current` symlink the rollout follows.
rm -rf "$EX/demo-site" "$EX/demo-run"
mkdir -p "$EX/demo-site/releases/1" "$EX/demo-run"
cp "$EX/hello/app.py" "$EX/demo-site/releases/1/app.py"
ln -sfn releases/1 "$EX/demo-site/current"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
NGX=$EX/demo-run/nginx
mkdir -p "$NGX"
cat > "$NGX/nginx.conf" <<CONF
daemon on;
worker_processes 1;
$( [ "$(id -u)" = 0 ] && echo "user root;" )
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $NGX/body; fastcgi_temp_path $NGX/fcgi;
  proxy_temp_path $NGX/proxy; uwsgi_temp_path $NGX/uwsgi; scgi_temp_path $NGX/scgi;
  upstream hello { server unix:$EX/demo-run/hello.sock; keepalive 16; }
  upstream perl  { server unix:$EX/demo-run/perl.sock; }
  server {
    listen 127.0.0.1:$PORT;
    location /perl/ { include /etc/nginx/fastcgi_params; fastcgi_pass perl; }
    location / {
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_NAME "";
      fastcgi_param PATH_INFO \$uri;
      fastcgi_pass hello;
      fastcgi_keep_conn on;
    }
  }
}
CONF

cleanup() {
  $FE stop >/dev/null 2>&1 || true
  [ -f "$NGX/nginx.pid" ] && kill -QUIT "$(cat "$NGX/nginx.pid")" 2>/dev/null || true
}
trap cleanup EXIT

echo "== fcgi-engine start"
$FE start
$FE status
nginx -c "$NGX/nginx.conf" -p "$NGX"
echo "== nginx on http://127.0.0.1:$PORT/ (fastcgi_keep_conn on for the Python app)"
curl -s "http://127.0.0.1:$PORT/" || python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:$PORT/').read().decode(),end='')"

echo "== load: 8 keep-alive clients for 12 s; meanwhile release 2 and 3 are rolled out"
python3 "$EX/load.py" --port "$PORT" --clients 8 --seconds 12 > "$EX/demo-run/load.out" &
LOAD=$!
python3 "$EX/load.py" --port "$PORT" --path /perl/ --clients 2 --seconds 12 > "$EX/demo-run/load-perl.out" &
LOADP=$!
sleep 2
for n in 2 3; do
  mkdir -p "$EX/demo-site/releases/$n"
  cp "$EX/hello/app.py" "$EX/demo-site/releases/$n/app.py"
  ln -sfn "releases/$n" "$EX/demo-site/current.new" && mv -T "$EX/demo-site/current.new" "$EX/demo-site/current"
  echo "-- deployed release $n; fcgi-engine graceful"
  $FE graceful
  sleep 1
done
status=0
wait $LOAD || status=1
wait $LOADP || status=1
cat "$EX/demo-run/load.out" "$EX/demo-run/load-perl.out"
echo "== fcgi-engine status"
$FE status
echo "== fcgi-engine stop"
$FE stop
if [ $status = 0 ]; then echo "demo: every request answered across 4 rollouts"; else echo "demo: some requests failed"; fi
exit $status
