package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/caddypki"
	"github.com/caddyserver/certmagic"
)

// TestCaddyLifecycle runs Caddy in-process with `storage circle`, the
// circle app and the pki app: the storage provisions the circle app (the
// pki app writes its root through it while being provisioned), the admin
// API answers, and a config reload reuses the node.
func TestCaddyLifecycle(t *testing.T) {
	secretFile, secret := writeSecretFile(t)
	dataDir := t.TempDir()
	admin := freeAddr(t)
	gossip := freeAddr(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())

	config := func(replicas int) []byte {
		return []byte(fmt.Sprintf(`{
			"admin": {"listen": %q},
			"storage": {"module": "circle"},
			"apps": {
				"circle": {"name": "solo", "domain": "circle.test", "secret_file": %q,
					"data_dir": %q, "listen": %q, "replicas": %d},
				"pki": {"certificate_authorities": {"local": {"install_trust": false}}},
				"http": {"https_port": 9443}
			}
		}`, admin, secretFile, dataDir, gossip, replicas))
	}
	if err := caddy.Load(config(1), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { caddy.Stop() })

	call := func(method, path string, body any) (int, []byte) {
		t.Helper()
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, "http://"+admin+path, rd)
		req.Header.Set("Content-Type", "application/json")
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	status, body := call("GET", "/circle/status", nil)
	if status != http.StatusOK {
		t.Fatalf("status: %d %s", status, body)
	}
	var st statusJSON
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatal(err)
	}
	if st.Name != "solo" || st.Domain != "circle.test" || len(st.Members) != 1 || st.Members[0].State != "alive" {
		t.Fatalf("status %s", body)
	}

	// The pki app's root lives in storage circle, its key sealed.
	stor, ok := certmagic.Default.Storage.(*Storage)
	if !ok {
		t.Fatalf("certmagic default storage is %T", certmagic.Default.Storage)
	}
	rec, err := stor.node.Get(bucketCerts, "pki/authorities/local/root.key")
	if err != nil {
		t.Fatalf("root key not in storage circle: %v", err)
	}
	if bytes.Contains(rec.Value, []byte("PRIVATE KEY")) {
		t.Fatal("root key stored in the clear")
	}
	status, body = call("GET", "/pki/ca/local", nil)
	if status != http.StatusOK || !strings.Contains(string(body), "BEGIN CERTIFICATE") {
		t.Fatalf("pki root: %d %s", status, body)
	}
	rootBefore := string(body)

	status, body = call("POST", "/circle/users", map[string]any{"username": "ana", "password": "a long password", "groups": []string{"family"}})
	if status != http.StatusCreated {
		t.Fatalf("create user: %d %s", status, body)
	}
	status, body = call("POST", "/circle/invites", map[string]any{"groups": []string{"family"}})
	if status != http.StatusOK || !strings.Contains(string(body), `"url":"https://circle.test:9443/register?invite=`) {
		t.Fatalf("invite: %d %s, want a URL with the https port", status, body)
	}
	app := activeApp.Load()
	repl := app.Replicator()

	// Reload with a changed setting: same node, same data.
	if err := caddy.Load(config(2), true); err != nil {
		t.Fatal(err)
	}
	app2 := activeApp.Load()
	if app2 == app || app2.Replicator() != repl {
		t.Fatal("reload did not reuse the node")
	}
	if status, body = call("GET", "/pki/ca/local", nil); string(body) != rootBefore {
		t.Fatalf("root changed across reload: %d", status)
	}
	status, body = call("POST", "/circle/users", map[string]any{"username": "ana", "password": "a long password"})
	if status != http.StatusConflict {
		t.Fatalf("duplicate user after reload: %d %s, want 409", status, body)
	}
	if strings.Contains(string(body), secret) {
		t.Fatal("admin answer contains the secret")
	}
	accts, err := app2.Identity().Accounts()
	if err != nil || len(accts) != 1 {
		t.Fatalf("accounts after reload: %v %v", accts, err)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, ok := nodes.References(app2.poolKey); ok {
		t.Fatal("node still pooled after caddy.Stop")
	}
}
