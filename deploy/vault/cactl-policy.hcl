# Least privilege for cactl with the defaults: PKI mount `pki`, KV v2 mount `secret`, state at
# `secret/cactl/state`, KV roots under `secret/cactl/roots/`. Drop the blocks of the backends you
# do not use. cactl never reads a PKI key: the mount's keys are not listed or read here.

# vault-pki: create new roots (a root rotation adds an issuer), read issuers, sign intermediates.
path "pki/issuers/generate/root/internal" {
  capabilities = ["update"]
}
path "pki/issuer/+/sign-intermediate" {
  capabilities = ["update"]
}
# Read an issuer (to adopt it at init); patch its usage when its root is retired.
path "pki/issuer/+" {
  capabilities = ["read", "patch"]
}

# vault-kv state store: the journal, written with check-and-set.
path "secret/data/cactl/state" {
  capabilities = ["create", "read", "update"]
}

# vault-kv root backend: root secrets are written once and read to sign.
path "secret/data/cactl/roots/*" {
  capabilities = ["create", "read"]
}

# The token's own lifecycle.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
