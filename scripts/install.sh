# Installs what clickhouse-etl needs on a Debian machine; sourced by demo.sh and test.sh.
# Debian packages: Java and Maven (the Kafka broker's jars come from Maven Central), PostgreSQL and Redis.
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the Dagster UI browser tests drive it (no downloaded browser)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
