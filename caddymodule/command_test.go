package caddymodule

import (
	"errors"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
)

func TestSplitListAndPassword(t *testing.T) {
	if got := splitList(" family, friends,,"); !reflect.DeepEqual(got, []string{"family", "friends"}) {
		t.Fatalf("splitList = %v", got)
	}
	if got := splitList(""); got != nil {
		t.Fatalf("splitList(\"\") = %v", got)
	}
	for in, want := range map[string]string{
		"pass word\n":         "pass word",
		"pass\r\nsecond line": "pass",
		"no newline":          "no newline",
	} {
		if got, err := readPassword(strings.NewReader(in)); err != nil || got != want {
			t.Errorf("readPassword(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := readPassword(strings.NewReader("\n")); err == nil {
		t.Error("empty password accepted")
	}
}

func TestPrintStatus(t *testing.T) {
	var b strings.Builder
	printStatus(&b, statusJSON{
		Name: "alpha", Domain: "circle.test", Role: "member",
		Members: []memberJSON{
			{Name: "alpha", Addr: "127.0.0.1:1", State: "alive", Path: "self"},
			{Name: "beta", Addr: "127.0.0.1:2", State: "dead", ClockOffset: "3ms"},
			{Name: "gamma", Addr: "127.0.0.1:3", State: "alive", Path: "direct", ClockOffset: "10m0.002s", ClockSkewed: true},
		},
		MaxClockSkew: "1m0s",
		Replication:  replicationJSON{Replicas: 2, AlivePeers: 0, UnderReplicated: 3},
	})
	out := b.String()
	for _, want := range []string{"node alpha of circle circle.test", "role: member", "degraded: 3 records on fewer than 2 nodes", "MEMBER", "beta", "dead", "+3ms", "+10m0.002s (beyond max 1m0s"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
}

// TestAdminCallAgainstAdminAPI drives the admin routes through the same
// client code the subcommands use.
func TestAdminCallAgainstAdminAPI(t *testing.T) {
	app := &App{Name: "alpha", DomainName: "circle.test", ident: testIdentity(t, identity.NewMemStore())}
	a := &adminAPI{logger: zap.NewNop(), app: func() *App { return app }}
	mux := http.NewServeMux()
	for _, r := range a.Routes() {
		h := r.Handler
		mux.HandleFunc(r.Pattern, func(w http.ResponseWriter, req *http.Request) {
			if err := h.ServeHTTP(w, req); err != nil {
				var apiErr caddy.APIError
				errors.As(err, &apiErr)
				http.Error(w, `{"error":"`+apiErr.Error()+`"}`, apiErr.HTTPStatus)
			}
		})
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()

	var acct accountJSON
	if err := adminCall(addr, "POST", "/circle/users", newUserRequest{Username: "bo", Password: "a long password", Groups: []string{"family"}}, &acct); err != nil {
		t.Fatal(err)
	}
	if acct.Username != "bo" || !reflect.DeepEqual(acct.Groups, []string{"family"}) {
		t.Fatalf("account %+v", acct)
	}
	err = adminCall(addr, "POST", "/circle/users", newUserRequest{Username: "bo", Password: "a long password"}, nil)
	if err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("duplicate user: %v, want an HTTP 409 error", err)
	}
	var inv inviteJSON
	if err := adminCall(addr, "POST", "/circle/invites", inviteRequest{TTL: "3d"}, &inv); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(inv.URL, "https://circle.test/register?invite=") {
		t.Fatalf("invite URL %q", inv.URL)
	}
}
