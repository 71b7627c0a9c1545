package relay

import (
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// Mesh authentication. Every circle derives one Ed25519 "circle CA" key
// from its secret: seed = HKDF-SHA256(secret, info "circle mesh ca v1").
// Each Mesh makes a fresh Ed25519 key and a certificate for it, Subject
// CN = node name, signed by the circle CA key. Both sides of a QUIC
// connection (TLS 1.3, mutual) accept only a peer certificate whose
// signature verifies under the circle CA key, that is valid now and that
// names another node (and the expected one, when the dialer knows it). A
// peer without the secret can neither present such a certificate nor
// accept ours, so the handshake fails on both sides; the node name is
// bound to the connection by the certificate.

const meshCAInfo = "circle mesh ca v1"

// meshCA derives the circle CA key pair from the secret.
func meshCA(secret []byte) (ed25519.PrivateKey, error) {
	if len(secret) < 16 {
		return nil, fmt.Errorf("%w: secret must be at least 16 bytes", ErrInvalid)
	}
	seed, err := hkdf.Key(sha256.New, secret, nil, meshCAInfo, ed25519.SeedSize)
	if err != nil {
		return nil, err
	}
	return ed25519.NewKeyFromSeed(seed), nil
}

// nodeCert makes a fresh key and a certificate for node signed by ca.
func nodeCert(ca ed25519.PrivateKey, node string, now time.Time) (tls.Certificate, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: node},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	parent := &x509.Certificate{
		Subject:   pkix.Name{CommonName: "circle mesh ca"},
		PublicKey: ca.Public(),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, ca)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}, nil
}

// verifyPeer checks a peer's certificate chain (leaf only) against the
// circle CA key and returns the node name it carries. self is our own
// name (a peer may not claim it); want, if not empty, is the name the
// peer must have.
func verifyPeer(caPub ed25519.PublicKey, rawCerts [][]byte, self, want string, now time.Time) (string, error) {
	if len(rawCerts) == 0 {
		return "", fmt.Errorf("%w: peer sent no certificate", ErrAuth)
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return "", fmt.Errorf("%w: peer certificate: %w", ErrAuth, err)
	}
	if leaf.SignatureAlgorithm != x509.PureEd25519 ||
		!ed25519.Verify(caPub, leaf.RawTBSCertificate, leaf.Signature) {
		return "", fmt.Errorf("%w: peer certificate is not signed by the circle key", ErrAuth)
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return "", fmt.Errorf("%w: peer certificate is not valid now", ErrAuth)
	}
	name := leaf.Subject.CommonName
	switch {
	case name == "":
		return "", fmt.Errorf("%w: peer certificate names no node", ErrAuth)
	case name == self:
		return "", fmt.Errorf("%w: peer claims our own name %q", ErrAuth, name)
	case want != "" && name != want:
		return "", fmt.Errorf("%w: peer is %q, want %q", ErrAuth, name, want)
	}
	return name, nil
}

// peerNameOf returns the node name in a verified connection's peer
// certificate.
func peerNameOf(cs tls.ConnectionState) (string, error) {
	if len(cs.PeerCertificates) == 0 {
		return "", errors.New("relay: no peer certificate")
	}
	return cs.PeerCertificates[0].Subject.CommonName, nil
}
