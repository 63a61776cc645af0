// Command gocheck checks cactl's output with Go's crypto/x509, the library istiod and
// istio-agent use. It depends on the standard library only, so it builds offline.
//
//	gocheck cacerts DIR                  istiod's plug-in CA load checks on DIR
//	gocheck leaf CHAIN ROOTS SPIFFE_ID   verify a workload chain (leaf first) for client and server auth
//	gocheck csr STYLE KEY SPIFFE_ID OUT  write a CSR shaped like istio-agent's (STYLE=agent) or ztunnel's (STYLE=ztunnel); KEY=rsa2048|p256
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: gocheck cacerts|leaf|csr ...")
	}
	var err error
	switch os.Args[1] {
	case "cacerts":
		need(3)
		err = checkCACerts(os.Args[2])
	case "leaf":
		need(5)
		err = checkLeaf(os.Args[2], os.Args[3], os.Args[4])
	case "csr":
		need(6)
		err = writeCSR(os.Args[2], os.Args[3], os.Args[4], os.Args[5])
	default:
		fail("unknown command " + os.Args[1])
	}
	if err != nil {
		fail(err.Error())
	}
	fmt.Println("OK")
}

func need(n int) {
	if len(os.Args) != n {
		fail(fmt.Sprintf("%s: wrong number of arguments", os.Args[1]))
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "FAIL:", msg)
	os.Exit(1)
}

// parseCerts returns every CERTIFICATE block of a PEM file.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// parseKey accepts the three block types istiod's ParsePemEncodedKey accepts, first block only.
func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("ca-key.pem: no PEM block")
	}
	switch block.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		return x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, errors.New("ca-key.pem: PKCS#8 key is not a signer")
		}
		return s, nil
	}
	return nil, fmt.Errorf("ca-key.pem: unsupported PEM block %q", block.Type)
}

func checkCACerts(dir string) error {
	files := map[string][]byte{}
	for _, name := range []string{"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return fmt.Errorf("incomplete signing CA bundle: %v", err)
		}
		files[name] = b
	}
	certs, err := parseCerts(files["ca-cert.pem"])
	if err != nil || len(certs) == 0 {
		return fmt.Errorf("ca-cert.pem: %v (%d certs)", err, len(certs))
	}
	signing := certs[0]
	if _, err := parseKey(files["ca-key.pem"]); err != nil {
		return err
	}
	if _, err := tls.X509KeyPair(files["ca-cert.pem"], files["ca-key.pem"]); err != nil {
		return fmt.Errorf("key does not match ca-cert.pem: %v", err)
	}
	if !signing.IsCA {
		return errors.New("certificate is not authorized to sign other certificates")
	}
	roots, err := parseCerts(files["root-cert.pem"])
	if err != nil || len(roots) == 0 {
		return fmt.Errorf("root-cert.pem: %v (%d certs)", err, len(roots))
	}
	chain, err := parseCerts(files["cert-chain.pem"])
	if err != nil {
		return fmt.Errorf("cert-chain.pem: %v", err)
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	interPool := x509.NewCertPool()
	for _, c := range chain {
		interPool.AddCert(c)
	}
	// istiod's util.Verify: default options, so the chain must allow serverAuth.
	chains, err := signing.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: interPool})
	if err != nil {
		return fmt.Errorf("cannot verify the cert with the provided root chain and cert pool: %v", err)
	}
	fmt.Printf("verified %d chain(s) of length %d; %d root(s) in root-cert.pem\n", len(chains), len(chains[0]), len(roots))
	return nil
}

func checkLeaf(chainPath, rootsPath, spiffeID string) error {
	chainPEM, err := os.ReadFile(chainPath)
	if err != nil {
		return err
	}
	rootsPEM, err := os.ReadFile(rootsPath)
	if err != nil {
		return err
	}
	chain, err := parseCerts(chainPEM)
	if err != nil || len(chain) == 0 {
		return fmt.Errorf("chain: %v (%d certs)", err, len(chain))
	}
	roots, err := parseCerts(rootsPEM)
	if err != nil || len(roots) == 0 {
		return fmt.Errorf("roots: %v (%d certs)", err, len(roots))
	}
	leaf := chain[0]
	if leaf.IsCA {
		return errors.New("leaf is a CA")
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != spiffeID {
		return fmt.Errorf("leaf URIs %v, want [%s]", leaf.URIs, spiffeID)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		return errors.New("leaf has names besides the SPIFFE URI")
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			return fmt.Errorf("verify for usage %v: %v", usage, err)
		}
	}
	return nil
}

// writeCSR builds a CSR the way istio-agent (GenCSRTemplate: subject O="", critical URI SAN)
// or ztunnel (empty subject, critical URI SAN, P-256) do.
func writeCSR(style, keyType, spiffeID, out string) error {
	var key crypto.Signer
	var err error
	switch keyType {
	case "rsa2048":
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	case "rsa1024":
		key, err = rsa.GenerateKey(rand.Reader, 1024)
	case "p256":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		return fmt.Errorf("unknown key type %s", keyType)
	}
	if err != nil {
		return err
	}
	u, err := url.Parse(spiffeID)
	if err != nil {
		return err
	}
	san, err := marshalURISAN(u.String())
	if err != nil {
		return err
	}
	tmpl := &x509.CertificateRequest{
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	switch style {
	case "agent":
		tmpl.Subject = pkix.Name{Organization: []string{""}}
	case "ztunnel":
	default:
		return fmt.Errorf("unknown style %s", style)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return err
	}
	return os.WriteFile(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0o644)
}

func marshalURISAN(uri string) ([]byte, error) {
	return asn1.Marshal([]asn1.RawValue{{Tag: 6, Class: asn1.ClassContextSpecific, Bytes: []byte(uri)}})
}
