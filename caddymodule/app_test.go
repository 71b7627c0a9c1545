package caddymodule

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/replicator"
)

func writeSecretFile(t *testing.T) (path, secret string) {
	t.Helper()
	secret = newSecret()
	path = filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, secret
}

// TestAppSharedNode: two configs of the same node (a reload) share one
// replicator + identity; the node closes when the last one is cleaned up.
func TestAppSharedNode(t *testing.T) {
	secretFile, _ := writeSecretFile(t)
	dir := t.TempDir()
	listen := freeAddr(t)
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	mk := func() *App {
		return &App{Name: "alpha", DomainName: "Circle.Test.", SecretFile: secretFile, DataDir: dir, Listen: listen, Replicas: 1}
	}

	a1 := mk()
	if err := a1.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if a1.Domain() != "circle.test" || a1.NodeName() != "alpha" || a1.Identity() == nil || a1.Replicator() == nil {
		t.Fatalf("accessors: %q %q %v %v", a1.Domain(), a1.NodeName(), a1.Identity(), a1.Replicator())
	}
	if err := a1.Start(); err != nil {
		t.Fatal(err)
	}
	if activeApp.Load() != a1 {
		t.Fatal("started app is not the active one")
	}

	a2 := mk() // the reloaded config
	if err := a2.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if a2.Replicator() != a1.Replicator() || a2.Identity() != a1.Identity() {
		t.Fatal("a reload opened a second node")
	}
	if refs, ok := nodes.References(a1.poolKey); !ok || refs != 2 {
		t.Fatalf("pool references %d %v, want 2", refs, ok)
	}
	a2.Start()
	a1.Stop()
	if activeApp.Load() != a2 {
		t.Fatal("stopping the old config detached the new one")
	}
	repl := a2.Replicator()
	if err := a1.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := repl.Get("accounts", "x"); !errors.Is(err, replicator.ErrNotFound) {
		t.Fatalf("node unusable after the old config's cleanup: %v", err)
	}
	if _, err := a2.Identity().CreateAccount(context.Background(), identity.NewAccount{Username: "ana", Password: "a long password"}); err != nil {
		t.Fatal(err)
	}
	key := a2.poolKey
	a2.Stop()
	if err := a2.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, ok := nodes.References(key); ok {
		t.Fatal("node still pooled after the last cleanup")
	}
	if _, err := repl.Get("accounts", "x"); err == nil || errors.Is(err, replicator.ErrNotFound) {
		t.Fatalf("node still open after the last cleanup: %v", err)
	}

	// The data survives a restart of the node.
	a3 := mk()
	if err := a3.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer a3.Cleanup()
	accts, err := a3.Identity().Accounts()
	if err != nil || len(accts) != 1 || accts[0].Username != "ana" {
		t.Fatalf("accounts after reopening: %v %v", accts, err)
	}
}

func TestAppProvisionErrors(t *testing.T) {
	secretFile, secret := writeSecretFile(t)
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	t.Setenv("CIRCLE_TEST_SECRET", secret)
	t.Setenv("CIRCLE_TEST_BAD", "%%not-a-secret-value%%")
	for _, tc := range []struct {
		name string
		app  App
		want string
	}{
		{"no secret", App{Name: "a", DomainName: "d.test"}, "secret_file (or secret) is required"},
		{"both secrets", App{Name: "a", DomainName: "d.test", SecretFile: secretFile, Secret: "{env.CIRCLE_TEST_SECRET}"}, "not both"},
		{"literal secret", App{Name: "a", DomainName: "d.test", Secret: secret}, "placeholder"},
		{"unset env", App{Name: "a", DomainName: "d.test", Secret: "{env.CIRCLE_TEST_UNSET}"}, "did not resolve"},
		{"bad env value", App{Name: "a", DomainName: "d.test", Secret: "{env.CIRCLE_TEST_BAD}"}, "base64"},
		{"missing file", App{Name: "a", DomainName: "d.test", SecretFile: "/nonexistent/secret"}, "reading secret_file"},
		{"no name", App{DomainName: "d.test", SecretFile: secretFile}, "name is required"},
		{"no domain", App{Name: "a", SecretFile: secretFile}, "domain is required"},
		{"bad join", App{Name: "a", DomainName: "d.test", SecretFile: secretFile, Join: []string{"nope"}}, "address"},
		{"bad listen", App{Name: "a", DomainName: "d.test", SecretFile: secretFile, Listen: "7946"}, "address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.app
			a.DataDir = t.TempDir()
			err := a.Provision(ctx)
			if err == nil {
				a.Cleanup()
				t.Fatalf("provisioned, want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want one containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "not-a-secret-value") {
				t.Fatalf("error contains the secret: %v", err)
			}
			if err := a.Cleanup(); err != nil {
				t.Fatalf("cleanup after failed provision: %v", err)
			}
		})
	}

	t.Run("env placeholder", func(t *testing.T) {
		a := App{Name: "envnode", DomainName: "d.test", Secret: "{env.CIRCLE_TEST_SECRET}", DataDir: t.TempDir(), Listen: freeAddr(t), Replicas: 1}
		if err := a.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		a.Cleanup()
	})
	t.Run("file placeholder", func(t *testing.T) {
		a := App{Name: "filenode", DomainName: "d.test", Secret: "{file." + secretFile + "}", DataDir: t.TempDir(), Listen: freeAddr(t), Replicas: 1}
		if err := a.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		a.Cleanup()
	})
}
