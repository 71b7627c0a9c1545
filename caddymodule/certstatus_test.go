package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// The status lists stored certificates with the node that stored them and
// the last error of their names, which a later success clears.
func TestCertificatesStatus(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "statusnode", testSecret(t))
	s := newTestStorage(t, n, testSecret(t))
	crt, key := testCertPEM(t, "a.example", "www.a.example")
	prefix := "certificates/acme-v02.api.letsencrypt.org-directory/a.example/a.example"
	for k, v := range map[string][]byte{".crt": crt, ".key": key, ".json": []byte(`{}`)} {
		if err := s.Store(ctx, prefix+k, v); err != nil {
			t.Fatal(err)
		}
	}
	h := &certEvents{node: n, nodeName: "statusnode", logger: zap.NewNop()}
	emit := func(name string, data map[string]any) {
		t.Helper()
		ev, err := caddy.NewEvent(caddy.Context{Context: ctx}, name, data)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Handle(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	emit("cert_failed", map[string]any{"identifier": "a.example", "renewal": true, "error": errors.New("rate limited")})
	emit("cert_failed", map[string]any{"identifier": "never.example", "error": errors.New("no DNS")})
	emit("cert_failed", map[string]any{"identifier": 42}) // malformed: ignored

	st := certificatesStatus(n)
	if len(st) != 2 {
		t.Fatalf("status: %+v", st)
	}
	c := st[0]
	if strings.Join(c.Names, ",") != "a.example,www.a.example" || c.RenewedBy != "statusnode" || c.Serial == "" ||
		c.NotAfter.IsZero() || c.Issuer != "acme-v02.api.letsencrypt.org-directory" || c.Problem != "" {
		t.Fatalf("certificate status: %+v", c)
	}
	if c.LastError != "rate limited" || c.LastErrorNode != "statusnode" || c.LastErrorTime.IsZero() {
		t.Fatalf("last error: %+v", c)
	}
	if st[1].Names[0] != "never.example" || st[1].LastError != "no DNS" || st[1].Problem == "" {
		t.Fatalf("failing name without certificate: %+v", st[1])
	}

	var out bytes.Buffer
	printCertificates(&out, st)
	for _, want := range []string{"CERTIFICATE", "a.example,www.a.example", "statusnode", "renewal failing", "rate limited", "never.example"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("printed status lacks %q:\n%s", want, out.String())
		}
	}

	emit("cert_obtained", map[string]any{"identifier": "a.example", "renewal": true})
	if st := certificatesStatus(n); st[0].LastError != "" {
		t.Fatalf("error not cleared by a success: %+v", st[0])
	}
	out.Reset()
	printCertificates(&out, nil)
	if !strings.Contains(out.String(), "no certificates") {
		t.Fatalf("empty status: %q", out.String())
	}

	// Lock leases show with their owner.
	if err := s.Lock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	defer s.Unlock(ctx, "issue_cert_a.example")
	locks := locksStatus(n)
	if len(locks) != 1 || locks[0].Name != "issue_cert_a.example" || !strings.HasPrefix(locks[0].Owner, "statusnode/") || locks[0].Expired {
		t.Fatalf("locks: %+v", locks)
	}
}
