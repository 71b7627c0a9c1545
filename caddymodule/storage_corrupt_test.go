package caddymodule

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// testIssuer is a certmagic.Issuer backed by a throwaway CA; it counts
// issuances.
type testIssuer struct {
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey

	mu     sync.Mutex // guards issued and serial
	issued int
	serial int64
}

func newTestIssuer(t *testing.T) *testIssuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	return &testIssuer{caCert: ca, caKey: key, serial: 100}
}

func (ti *testIssuer) Issue(_ context.Context, csr *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	ti.mu.Lock()
	ti.issued++
	ti.serial++
	serial := ti.serial
	ti.mu.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: csr.DNSNames[0]},
		DNSNames:     csr.DNSNames,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ti.caCert, csr.PublicKey, ti.caKey)
	if err != nil {
		return nil, err
	}
	return &certmagic.IssuedCertificate{Certificate: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

func (ti *testIssuer) IssuerKey() string { return "testca" }

func (ti *testIssuer) count() int {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	return ti.issued
}

// manage runs certmagic, as a freshly started node would, over s: it loads
// the certificate of name from storage or obtains one, and returns the
// serial it serves.
func manage(t *testing.T, s *Storage, iss *testIssuer, name string) (*big.Int, error) {
	t.Helper()
	var cfg *certmagic.Config
	cache := certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) { return cfg, nil },
		Logger:           zap.NewNop(),
	})
	defer cache.Stop()
	cfg = certmagic.New(cache, certmagic.Config{
		Storage: s,
		Issuers: []certmagic.Issuer{iss},
		Logger:  zap.NewNop(),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := cfg.ManageSync(ctx, []string{name}); err != nil {
		return nil, err
	}
	cert, err := cfg.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, err
	}
	return leaf.SerialNumber, nil
}

// Corrupted or truncated certificate records are detected on Load (never
// handed to certmagic, so never served); the certificate is obtained again.
// Nothing panics.
func TestStorageCorruptCertificates(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "corrupt", testSecret(t))
	s := newTestStorage(t, n, testSecret(t))
	iss := newTestIssuer(t)
	const name = "corrupt.example"
	prefix := "certificates/testca/" + name + "/" + name

	first, err := manage(t, s, iss, name)
	if err != nil {
		t.Fatal(err)
	}
	if iss.count() != 1 {
		t.Fatalf("%d issuances, want 1", iss.count())
	}
	// A node that starts next loads it: no new issuance.
	if again, err := manage(t, s, iss, name); err != nil || again.Cmp(first) != 0 || iss.count() != 1 {
		t.Fatalf("reload: serial %v (first %v), %v, %d issuances", again, first, err, iss.count())
	}

	rawCrt, err := n.Get(bucketCerts, prefix+".crt")
	if err != nil {
		t.Fatal(err)
	}
	rawKey, _ := n.Get(bucketCerts, prefix+".key")
	rawMeta, _ := n.Get(bucketCerts, prefix+".json")

	cases := []struct {
		key   string
		value []byte
	}{
		{".crt", rawCrt.Value[:len(rawCrt.Value)/2]},                              // truncated PEM
		{".crt", []byte(strings.Replace(string(rawCrt.Value), "MII", "MIJ", 1))},  // bad DER
		{".crt", append(append([]byte{}, rawCrt.Value...), []byte("garbage")...)}, // trailing data
		{".crt", nil}, // empty
		{".key", rawKey.Value[:len(rawKey.Value)-3]},                                    // truncated sealed key
		{".key", append([]byte{rawKey.Value[0]}, make([]byte, len(rawKey.Value)-1)...)}, // zeroed
		{".json", rawMeta.Value[:len(rawMeta.Value)/2]},                                 // truncated JSON
	}
	prev := first
	for i, c := range cases {
		// The corruption arrives as a replicated record, like any write.
		if err := n.Put(ctx, bucketCerts, prefix+c.key, c.value); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(ctx, prefix+c.key); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("case %d (%s): Load of a corrupted record = %v, want fs.ErrNotExist", i, c.key, err)
		}
		if c.key == ".crt" {
			st := certificatesStatus(n)
			if len(st) != 1 || st[0].Problem == "" {
				t.Fatalf("case %d: status does not flag the corrupted certificate: %+v", i, st)
			}
		}
		before := iss.count()
		serial, err := manage(t, s, iss, name)
		if err != nil {
			t.Fatalf("case %d (%s): managing after corruption: %v", i, c.key, err)
		}
		if iss.count() != before+1 || serial.Cmp(prev) == 0 {
			t.Fatalf("case %d (%s): not reissued: serial %v (before %v), issuances %d -> %d", i, c.key, serial, prev, before, iss.count())
		}
		if st := certificatesStatus(n); len(st) != 1 || st[0].Problem != "" || st[0].Serial != serial.Text(16) || st[0].RenewedBy != "corrupt" {
			t.Fatalf("case %d: status after reissue: %+v", i, st)
		}
		prev = serial
	}
}

// Load never panics and never returns an unchecked value for arbitrary
// bytes under certificate keys.
func FuzzStorageLoad(f *testing.F) {
	certPEM, keyPEM := []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), []byte("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
	f.Add([]byte{}, uint8(0))
	f.Add(certPEM, uint8(0))
	f.Add(keyPEM, uint8(1))
	f.Add([]byte(`{"sans":["a"]}`), uint8(2))
	f.Add([]byte{1, 2, 3}, uint8(1))
	n := openTestNode(f, "fuzz", testSecret(f))
	s := &Storage{}
	if err := s.init(n, "fuzz", testSecret(f)); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Cleanup() })
	f.Fuzz(func(t *testing.T, value []byte, kind uint8) {
		key := "certificates/x/a.example/a.example" + []string{".crt", ".key", ".json"}[int(kind)%3]
		if len(value) > 1<<16 {
			return
		}
		if err := s.node.Put(context.Background(), bucketCerts, key, value); err != nil {
			t.Fatal(err)
		}
		got, err := s.Load(context.Background(), key)
		if err == nil {
			if ferr := checkRecordFormat(key, got); ferr != nil {
				t.Fatalf("Load returned a value that fails its format check: %v", ferr)
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Load under certificates/ = %v, want fs.ErrNotExist or a value", err)
		}
		certificatesStatus(s.node)
	})
}
