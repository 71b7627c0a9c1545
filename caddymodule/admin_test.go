package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
)

// testIdentity returns a started identity service on an in-memory store,
// with cheap password hashing.
func testIdentity(t *testing.T, store identity.Store) *identity.Service {
	t.Helper()
	svc, err := identity.New(store, identity.Config{
		Domain:       "circle.test",
		Secret:       make([]byte, 32),
		Argon2Memory: 64,
		Argon2Time:   1,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc
}

// callAdmin serves one admin request the way Caddy's admin server does:
// an APIError becomes its status and a JSON {"error"} body.
func callAdmin(t *testing.T, a *adminAPI, method, path, body string) (int, map[string]any) {
	t.Helper()
	var rd *strings.Reader
	if body != "" {
		rd = strings.NewReader(body)
	} else {
		rd = strings.NewReader("")
	}
	r := httptest.NewRequest(method, path, rd)
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	err := a.serve(w, r)
	status := w.Code
	if err != nil {
		var apiErr caddy.APIError
		if !errors.As(err, &apiErr) {
			t.Fatalf("%s %s: error is not a caddy.APIError: %v", method, path, err)
		}
		if apiErr.HTTPStatus == 0 {
			t.Fatalf("%s %s: APIError without status: %v", method, path, err)
		}
		return apiErr.HTTPStatus, map[string]any{"error": apiErr.Error()}
	}
	var out map[string]any
	if w.Body.Len() > 0 {
		if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
			t.Fatalf("%s %s: body %q: %v", method, path, w.Body.String(), err)
		}
	}
	return status, out
}

func TestAdminUsersAndInvites(t *testing.T) {
	app := &App{Name: "alpha", DomainName: "circle.test", ident: testIdentity(t, identity.NewMemStore())}
	a := &adminAPI{logger: zap.NewNop(), app: func() *App { return app }}

	status, body := callAdmin(t, a, "POST", "/circle/users",
		`{"username":"ana","password":"correct horse battery","name":"Ana","email":"ana@example.com","groups":["family","friends"]}`)
	if status != http.StatusCreated {
		t.Fatalf("create user: %d %v", status, body)
	}
	if body["username"] != "ana" || body["name"] != "Ana" || body["id"] == "" {
		t.Fatalf("account JSON %v", body)
	}
	if _, leaked := body["password"]; leaked {
		t.Fatalf("account JSON has a password field: %v", body)
	}

	for _, tc := range []struct {
		name, method, path, body string
		want                     int
	}{
		{"username taken", "POST", "/circle/users", `{"username":"ana","password":"another long password"}`, http.StatusConflict},
		{"username taken, other case", "POST", "/circle/users", `{"username":"ANA","password":"another long password"}`, http.StatusConflict},
		{"bad JSON", "POST", "/circle/users", `{"username":`, http.StatusBadRequest},
		{"empty body", "POST", "/circle/users", ``, http.StatusBadRequest},
		{"unknown field", "POST", "/circle/users", `{"username":"bo","password":"long enough pw","admin":true}`, http.StatusBadRequest},
		{"wrong type", "POST", "/circle/users", `{"username":"bo","password":"long enough pw","groups":"family"}`, http.StatusBadRequest},
		{"missing password", "POST", "/circle/users", `{"username":"bo"}`, http.StatusBadRequest},
		{"weak password", "POST", "/circle/users", `{"username":"bo","password":"short"}`, http.StatusBadRequest},
		{"invalid username", "POST", "/circle/users", `{"username":"no spaces allowed","password":"long enough pw"}`, http.StatusBadRequest},
		{"trailing data", "POST", "/circle/users", `{"username":"bo","password":"long enough pw"} {}`, http.StatusBadRequest},
		{"GET users", "GET", "/circle/users", ``, http.StatusMethodNotAllowed},
		{"unknown path", "GET", "/circle/nope", ``, http.StatusNotFound},
		{"bad ttl", "POST", "/circle/invites", `{"ttl":"soon"}`, http.StatusBadRequest},
		{"negative ttl", "POST", "/circle/invites", `{"ttl":"-1h"}`, http.StatusBadRequest},
		{"GET invites", "GET", "/circle/invites", ``, http.StatusMethodNotAllowed},
		{"GET rotate-key", "GET", "/circle/rotate-key", ``, http.StatusMethodNotAllowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body := callAdmin(t, a, tc.method, tc.path, tc.body)
			if status != tc.want {
				t.Fatalf("status %d (%v), want %d", status, body, tc.want)
			}
		})
	}

	status, body = callAdmin(t, a, "POST", "/circle/invites", `{"groups":["family"],"ttl":"1h"}`)
	if status != http.StatusOK {
		t.Fatalf("invite: %d %v", status, body)
	}
	u, err := url.Parse(body["url"].(string))
	if err != nil || u.Scheme != "https" || u.Host != "circle.test" || u.Path != "/register" || u.Query().Get("invite") == "" {
		t.Fatalf("invite URL %q", body["url"])
	}
	if _, ok := body["expires"].(string); !ok {
		t.Fatalf("invite without expires: %v", body)
	}
	if status, body := callAdmin(t, a, "POST", "/circle/invites", ``); status != http.StatusOK {
		t.Fatalf("invite with defaults: %d %v", status, body)
	}

	status, body = callAdmin(t, a, "POST", "/circle/rotate-key", ``)
	if status != http.StatusOK || body["kid"] == "" {
		t.Fatalf("rotate-key: %d %v", status, body)
	}
}

func TestAdminWithoutApp(t *testing.T) {
	a := &adminAPI{logger: zap.NewNop(), app: func() *App { return nil }}
	if status, _ := callAdmin(t, a, "GET", "/circle/status", ""); status != http.StatusServiceUnavailable {
		t.Fatalf("status without app: %d, want 503", status)
	}
}
