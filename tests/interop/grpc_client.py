"""An independent client of cactl's IstioCertificateService, written with grpcio.

It compiles proto/ with grpc_tools at run time, builds a CSR the way istio-agent (RSA-2048,
subject O="") or ztunnel (ECDSA P-256, empty subject) does, calls CreateCertificate over TLS
with ALPN h2, and checks the answer the way those clients read it: at least two elements, the
leaf first, the last element a bundle of one or more roots, and the leaf verifying up to those
roots for client and server authentication. Prints a JSON report; exits 1 on an RPC error.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from google.protobuf import struct_pb2
from grpc_tools import protoc


def load_stubs(proto_root):
    out = tempfile.mkdtemp(prefix="cactl-pb-")
    rc = protoc.main([
        "protoc",
        f"-I{proto_root}",
        f"-I{os.path.join(os.path.dirname(protoc.__file__), '_proto')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "istio/v1/auth/ca.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("istio.v1.auth.ca_pb2"),
        importlib.import_module("istio.v1.auth.ca_pb2_grpc"),
    )


def make_csr(style, identity):
    if style == "agent":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")])
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject).add_extension(san, critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def split_pems(text):
    return x509.load_pem_x509_certificates(text.encode())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--proto", required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", required=True)
    p.add_argument("--token")
    p.add_argument("--cluster")
    p.add_argument("--identity", required=True)
    p.add_argument("--style", choices=["agent", "ztunnel"], required=True)
    p.add_argument("--ttl", type=int, default=0)
    p.add_argument("--impersonate")
    a = p.parse_args()

    pb, pb_grpc = load_stubs(a.proto)
    with open(a.ca, "rb") as f:
        ca = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    channel = grpc.secure_channel(a.addr, creds, options=[("grpc.ssl_target_name_override", a.server_name)])
    stub = pb_grpc.IstioCertificateServiceStub(channel)

    md = struct_pb2.Struct()
    if a.impersonate:
        md.update({"ImpersonatedIdentity": a.impersonate})
    else:
        md.update({"CertSigner": ""})
    req = pb.IstioCertificateRequest(csr=make_csr(a.style, a.identity), validity_duration=a.ttl, metadata=md)
    headers = []
    if a.token:
        headers.append(("authorization", "Bearer " + a.token))
    if a.cluster:
        headers.append(("clusterid", a.cluster))
    try:
        resp = stub.CreateCertificate(req, metadata=headers, timeout=30)
    except grpc.RpcError as e:
        print(json.dumps({"ok": False, "code": e.code().name, "message": e.details()}))
        return 1

    chain = list(resp.cert_chain)
    report = {"ok": True, "elements": len(chain)}
    if len(chain) < 2:
        report["error"] = "invalid empty CertChain"
        print(json.dumps(report))
        return 1
    leaf = split_pems(chain[0])[0]
    intermediates = [split_pems(e)[0] for e in chain[1:-1]]
    roots = split_pems(chain[-1])
    store = Store(roots)
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    report.update({
        "leaf_uris": san.value.get_values_for_type(x509.UniformResourceIdentifier),
        "leaf_san_critical": san.critical,
        "leaf_subject_empty": len(leaf.subject) == 0,
        "leaf_ca": bc.value.ca,
        "leaf_bc_critical": bc.critical,
        "leaf_ku_critical": ku.critical,
        "leaf_key_encipherment": ku.value.key_encipherment,
        "leaf_eku": sorted(o.dotted_string for o in eku.value),
        "leaf_validity_seconds": int((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()),
        "intermediates": len(intermediates),
        "roots": len(roots),
        "verified_chain_length": len(verified.chain),
        "client_verified_subjects": [str(s.value) for s in (verified.subjects or [])],
    })
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
