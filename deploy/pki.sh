#!/usr/bin/env bash
# fedembed consortium PKI: a CA, the SuperLink's TLS certificate and one SuperNode auth key per site.
set -euo pipefail

PROG=$(basename "$0")
CA_DAYS=3650
SERVER_DAYS=825
RENEW_BEFORE_DAYS=30

usage() {
    cat <<EOF
Usage: $PROG OUT_DIR [--server-name NAME]... [--server-ip IP]... [options] SITE_NAME...

Creates (or completes) the key material of a fedembed federation in OUT_DIR:

  OUT_DIR/ca.crt              consortium CA certificate: give it to every site and to every
                              operator who runs the flwr CLI (root-certificates)
  OUT_DIR/ca.key              CA private key (0600): keep it offline, it signs SuperLink certificates
  OUT_DIR/server.pem          SuperLink TLS certificate, signed by the CA; its subjectAltName is
                              DNS:localhost, IP:127.0.0.1 plus every --server-name / --server-ip
  OUT_DIR/server.key          SuperLink TLS private key (0600)
  OUT_DIR/sites/SITE/site.key       the site's SuperNode authentication key, ECDSA P-384 in
                                    OpenSSH format (0600): stays at the site
  OUT_DIR/sites/SITE/site.key.pub   its public key: the coordinator registers it with
                                    flwr supernode register

Options:
  --server-name NAME   a DNS name the SuperNodes and the CLI use to reach the SuperLink
                       (repeatable), e.g. --server-name superlink.consortium.example
  --server-ip IP       an IP address they use to reach it (repeatable), e.g. --server-ip 10.0.0.5
  --connection NAME    flwr CLI connection name used in the printed commands (default: fedembed)
  --days N             validity of the SuperLink certificate in days (default: $SERVER_DAYS;
                       the CA is valid for $CA_DAYS days)
  --force              regenerate everything named: a new CA, a new SuperLink key and
                       certificate and new keys for the sites listed (sites must then be
                       registered again, and every holder of ca.crt needs the new one)
  -h, --help           show this help and exit

Re-running is safe: an existing CA and existing keys are kept. The SuperLink certificate is
re-issued (same key) only when it is missing, does not chain to ca.crt, lacks a requested
name or IP, or expires within $RENEW_BEFORE_DAYS days. Add a site later by running the script
again with the same OUT_DIR and the new SITE_NAME: the CA and the other sites stay as they are.
SITE_NAME: letters, digits, '.', '_' and '-' (it is a directory name and the key comment).

Needs only openssl and ssh-keygen.

Then, on the coordinator (the SuperLink host, with TLS and SuperNode authentication):
  flower-superlink --ssl-ca-certfile OUT_DIR/ca.crt --ssl-certfile OUT_DIR/server.pem \\
      --ssl-keyfile OUT_DIR/server.key --enable-supernode-auth --host 0.0.0.0 --port PORT \\
      --database state.db
  # flwr CLI connection in \$FLWR_HOME/config.toml:
  #   [superlink.fedembed]
  #   address = "SERVER:PORT"
  #   root-certificates = "/abs/path/OUT_DIR/ca.crt"
  flwr supernode register OUT_DIR/sites/SITE/site.key.pub fedembed     # once per site
At each site (it needs ca.crt and its own site.key only):
  flower-supernode --superlink SERVER:PORT --root-certificates ca.crt \\
      --auth-supernode-private-key site.key --node-config '...'
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

note() {
    echo "$PROG: $*"
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH (install $2)"
}

quiet() {
    # Run a command silently; on failure show what it printed and stop.
    local output
    if ! output=$("$@" 2>&1); then
        echo "$output" >&2
        die "'$*' failed"
    fi
}

# ---------------------------------------------------------------- arguments

OUT_DIR=""
CONNECTION="fedembed"
FORCE=0
SERVER_NAMES=()
SERVER_IPS=()
SITES=()

while (($# > 0)); do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --server-name)
            (($# >= 2)) || die "--server-name needs a value"
            [[ "$2" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "--server-name '$2' is not a DNS name"
            SERVER_NAMES+=("$2")
            shift 2
            ;;
        --server-ip)
            (($# >= 2)) || die "--server-ip needs a value"
            [[ "$2" =~ ^[0-9.]+$ || "$2" =~ ^[0-9A-Fa-f:]+$ ]] || die "--server-ip '$2' is not an IPv4 or IPv6 address"
            SERVER_IPS+=("$2")
            shift 2
            ;;
        --connection)
            (($# >= 2)) || die "--connection needs a value"
            CONNECTION="$2"
            shift 2
            ;;
        --days)
            (($# >= 2)) || die "--days needs a value"
            [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--days '$2' is not a positive number"
            SERVER_DAYS="$2"
            shift 2
            ;;
        --force)
            FORCE=1
            shift
            ;;
        --)
            shift
            SITES+=("$@")
            break
            ;;
        -*)
            die "unknown option '$1' (see $PROG --help)"
            ;;
        *)
            if [[ -z "$OUT_DIR" ]]; then
                OUT_DIR="$1"
            else
                SITES+=("$1")
            fi
            shift
            ;;
    esac
done

[[ -n "$OUT_DIR" ]] || {
    usage >&2
    exit 2
}
((${#SITES[@]} > 0)) || die "name at least one SITE_NAME (see $PROG --help)"
for site in "${SITES[@]}"; do
    [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "site name '$site': use letters, digits, '.', '_' and '-' (not first)"
done
need openssl "OpenSSL"
need ssh-keygen "OpenSSH's client tools"

umask 077
mkdir -p "$OUT_DIR/sites"
chmod 700 "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
CA_CRT="$OUT_DIR/ca.crt"
CA_KEY="$OUT_DIR/ca.key"
SERVER_CRT="$OUT_DIR/server.pem"
SERVER_KEY="$OUT_DIR/server.key"
WORK=$(mktemp -d "$OUT_DIR/.pki.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# A minimal request config, so neither the distribution's openssl.cnf nor its absence matters.
printf '[req]\ndistinguished_name = dn\n[dn]\n' >"$WORK/req.cnf"

# ---------------------------------------------------------------- CA

new_ec_key() {
    quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$1"
    chmod 600 "$1"
}

if ((FORCE)) || [[ ! -s "$CA_CRT" || ! -s "$CA_KEY" ]]; then
    if ((!FORCE)) && [[ -s "$CA_CRT" || -s "$CA_KEY" ]]; then
        die "only one of ca.crt and ca.key exists in $OUT_DIR: restore the other or use --force"
    fi
    new_ec_key "$WORK/ca.key"
    quiet openssl req -config "$WORK/req.cnf" -x509 -new -key "$WORK/ca.key" -sha384 -days "$CA_DAYS" \
        -subj "/O=fedembed consortium/CN=fedembed consortium CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$WORK/ca.crt"
    mv -f "$WORK/ca.key" "$CA_KEY"
    mv -f "$WORK/ca.crt" "$CA_CRT"
    chmod 644 "$CA_CRT"
    note "created CA $CA_CRT"
    CA_NEW=1
else
    openssl x509 -in "$CA_CRT" -noout >/dev/null 2>&1 || die "$CA_CRT is not a PEM certificate"
    note "kept CA $CA_CRT"
    CA_NEW=0
    openssl x509 -in "$CA_CRT" -noout -checkend $((RENEW_BEFORE_DAYS * 86400)) >/dev/null ||
        note "WARNING: the CA expires within $RENEW_BEFORE_DAYS days ($(openssl x509 -in "$CA_CRT" -noout -enddate)); plan a new one with --force"
fi
chmod 600 "$CA_KEY"

# ---------------------------------------------------------------- SuperLink certificate

NAMES=(localhost "${SERVER_NAMES[@]+"${SERVER_NAMES[@]}"}")
IPS=(127.0.0.1 "${SERVER_IPS[@]+"${SERVER_IPS[@]}"}")
# The address printed in the next steps and the certificate's CN: the first name/IP given.
PRIMARY="${SERVER_NAMES[0]:-${SERVER_IPS[0]:-localhost}}"
SAN=""
for name in "${NAMES[@]}"; do SAN+="${SAN:+,}DNS:$name"; done
for ip in "${IPS[@]}"; do SAN+="${SAN:+,}IP:$ip"; done

cert_matches() {
    # cert_matches host|ip VALUE: does server.pem's subjectAltName cover VALUE?
    [[ "$(openssl x509 -in "$SERVER_CRT" -noout "-check$1" "$2" 2>/dev/null)" == *" does match "* ]]
}

server_cert_reason() {
    # Prints why the SuperLink certificate must be (re-)issued; nothing if it is fine.
    if ((FORCE || CA_NEW)) || [[ ! -s "$SERVER_CRT" || ! -s "$SERVER_KEY" ]]; then
        echo "new"
    elif ! openssl verify -CAfile "$CA_CRT" "$SERVER_CRT" >/dev/null 2>&1; then
        echo "it does not chain to $CA_CRT"
    elif ! openssl x509 -in "$SERVER_CRT" -noout -checkend $((RENEW_BEFORE_DAYS * 86400)) >/dev/null; then
        echo "it expires within $RENEW_BEFORE_DAYS days"
    else
        for name in "${NAMES[@]}"; do
            cert_matches host "$name" || {
                echo "it lacks DNS:$name"
                return
            }
        done
        for ip in "${IPS[@]}"; do
            cert_matches ip "$ip" || {
                echo "it lacks IP:$ip"
                return
            }
        done
    fi
}

reason=$(server_cert_reason)
if [[ -n "$reason" ]]; then
    if ((FORCE)) || [[ ! -s "$SERVER_KEY" ]]; then
        new_ec_key "$WORK/server.key"
        mv -f "$WORK/server.key" "$SERVER_KEY"
    fi
    # Keep the names an existing certificate already had, so re-issuing never drops one.
    if [[ "$reason" != "new" && -s "$SERVER_CRT" ]]; then
        old=$(openssl x509 -in "$SERVER_CRT" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ' | sed 's/IPAddress:/IP:/g')
        IFS=',' read -r -a old_entries <<<"$old"
        for entry in "${old_entries[@]+"${old_entries[@]}"}"; do
            [[ -n "$entry" && ",$SAN," != *",$entry,"* ]] && SAN+=",$entry"
        done
    fi
    cat >"$WORK/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$SAN
EOF
    quiet openssl req -config "$WORK/req.cnf" -new -key "$SERVER_KEY" -sha384 \
        -subj "/O=fedembed consortium/CN=$PRIMARY" -out "$WORK/server.csr"
    quiet openssl x509 -req -in "$WORK/server.csr" -CA "$CA_CRT" -CAkey "$CA_KEY" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$SERVER_DAYS" -sha384 \
        -extfile "$WORK/server.ext" -out "$WORK/server.pem"
    quiet openssl verify -CAfile "$CA_CRT" "$WORK/server.pem"
    mv -f "$WORK/server.pem" "$SERVER_CRT"
    chmod 644 "$SERVER_CRT"
    if [[ "$reason" == "new" ]]; then
        note "created SuperLink certificate $SERVER_CRT ($SAN)"
    else
        note "re-issued SuperLink certificate $SERVER_CRT because $reason ($SAN); restart the SuperLink"
    fi
else
    note "kept SuperLink certificate $SERVER_CRT"
fi
chmod 600 "$SERVER_KEY"

# ---------------------------------------------------------------- site keys

for site in "${SITES[@]}"; do
    dir="$OUT_DIR/sites/$site"
    key="$dir/site.key"
    mkdir -p "$dir"
    chmod 700 "$dir"
    if ((FORCE)) || [[ ! -s "$key" ]]; then
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$key"
        note "created key of site $site: $key"
    else
        ssh-keygen -l -f "$key" >/dev/null 2>&1 || die "$key is not a private key ssh-keygen can read (use --force to replace it)"
        if [[ ! -s "$key.pub" ]]; then
            ssh-keygen -y -f "$key" >"$key.pub"
            note "restored public key $key.pub"
        fi
        note "kept key of site $site: $key"
    fi
    chmod 600 "$key"
    chmod 644 "$key.pub"
done

# ---------------------------------------------------------------- next steps

cat <<EOF

Next steps (coordinator):
  1. Start the SuperLink with TLS and SuperNode authentication:
       flower-superlink --ssl-ca-certfile $CA_CRT --ssl-certfile $SERVER_CRT \\
           --ssl-keyfile $SERVER_KEY --enable-supernode-auth --host 0.0.0.0 --port PORT \\
           --database state.db
  2. Point the flwr CLI at it (\$FLWR_HOME/config.toml):
       [superlink.$CONNECTION]
       address = "$PRIMARY:PORT"
       root-certificates = "$CA_CRT"
  3. Register each site's public key:
EOF
for site in "${SITES[@]}"; do
    echo "       flwr supernode register $OUT_DIR/sites/$site/site.key.pub $CONNECTION"
done
cat <<EOF
Then give each site ca.crt and its own sites/SITE/site.key (never ca.key), and start its SuperNode:
       flower-supernode --superlink $PRIMARY:PORT --root-certificates ca.crt \\
           --auth-supernode-private-key site.key --node-config '...'
EOF
