package caddymodule

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/homecircle/circle/identity"
)

// appRequest is a request to an app behind the gate, with a replacer in
// its context as Caddy's server would set up.
func appRequest(target, token, accept string) (*http.Request, *caddy.Replacer) {
	r := httptest.NewRequest("GET", target, nil)
	if accept != "" {
		r.Header.Set("Accept", accept)
	}
	if token != "" {
		r.AddCookie(&http.Cookie{Name: SessionCookie, Value: token})
	}
	repl := caddy.NewReplacer()
	ctx := context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl)
	return r.WithContext(ctx), repl
}

func TestGateValidSession(t *testing.T) {
	e := newTestEnv(t, nil)
	alice := e.createUser("alice", "correct horse", "family", "admins")
	tok, _ := e.session(alice)

	r, repl := appRequest("https://app.ourcircle.net/x", tok, "text/html")
	// Forged identity headers in any case, and lookalikes.
	r.Header["Remote-User"] = []string{"root"}
	r.Header["remote-groups"] = []string{"admins"}
	r.Header["REMOTE-EMAIL"] = []string{"root@example.com"}
	r.Header["Remote-Anything"] = []string{"x"}
	r.Header["Remote_User"] = []string{"root"}
	r.Header.Set("X-Other", "kept")
	next := &nextHandler{}
	w := serve(t, e.gate(nil, nil), r, next)
	if w.Code != 200 || !next.called {
		t.Fatalf("status %d, next %v", w.Code, next.called)
	}
	h := next.req.Header
	want := map[string][]string{
		"Remote-User":   {"alice"},
		"Remote-Name":   {"Alice"},
		"Remote-Email":  {"alice@example.com"},
		"Remote-Groups": {"admins,family"},
	}
	for k, v := range h {
		if strings.HasPrefix(strings.ToLower(k), "remote") {
			if !reflect.DeepEqual(v, want[k]) {
				t.Errorf("header %s = %v, want %v", k, v, want[k])
			}
		}
	}
	for k, v := range want {
		if !reflect.DeepEqual(h[k], v) {
			t.Errorf("header %s = %v, want %v", k, h[k], v)
		}
	}
	if h.Get("X-Other") != "kept" {
		t.Error("unrelated header removed")
	}
	for k, v := range map[string]string{
		"http.auth.user.id":       alice.ID,
		"http.auth.user.username": "alice",
		"http.auth.user.name":     "Alice",
		"http.auth.user.email":    "alice@example.com",
		"http.auth.user.groups":   "admins,family",
	} {
		if got, _ := repl.GetString(k); got != v {
			t.Errorf("placeholder %s = %q, want %q", k, got, v)
		}
	}
}

// TestGateStripsRemoteHeadersAlways: client Remote-* headers are removed
// also when the request is refused.
func TestGateStripsRemoteHeadersAlways(t *testing.T) {
	e := newTestEnv(t, nil)
	r, _ := appRequest("https://app.ourcircle.net/", "", "")
	r.Header.Set("Remote-User", "root")
	serve(t, e.gate(nil, nil), r, nil)
	if len(r.Header.Values("Remote-User")) != 0 {
		t.Error("Remote-User left on a refused request")
	}
}

// forgeToken builds a JWS with the given header and claims, signed by sign.
func forgeToken(header, claims map[string]any, sign func(signingInput string) []byte) string {
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	in := enc(header) + "." + enc(claims)
	return in + "." + base64.RawURLEncoding.EncodeToString(sign(in))
}

func TestGateRefusesBadSessions(t *testing.T) {
	e := newTestEnv(t, nil)
	alice := e.createUser("alice", "correct horse", "family")
	good, sess := e.session(alice)

	// Header and claims of a real token, for forgeries.
	parts := strings.Split(good, ".")
	var hdr map[string]any
	hb, _ := base64.RawURLEncoding.DecodeString(parts[0])
	_ = json.Unmarshal(hb, &hdr)
	kid, _ := hdr["kid"].(string)
	now := e.clock.Now()
	claims := map[string]any{
		"iss": "https://" + testDomain, "sub": alice.ID, "sid": sess.ID,
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(),
		"username": "alice", "groups": []string{"family", "admins"},
	}
	var jwks struct {
		Keys []struct{ X string } `json:"keys"`
	}
	if err := json.Unmarshal(e.ident.JWKS(), &jwks); err != nil || len(jwks.Keys) == 0 {
		t.Fatalf("jwks: %v", err)
	}
	pub, _ := base64.RawURLEncoding.DecodeString(jwks.Keys[0].X)
	hs256 := func(key []byte) func(string) []byte {
		return func(in string) []byte {
			m := hmac.New(sha256.New, key)
			m.Write([]byte(in))
			return m.Sum(nil)
		}
	}

	// A token of another circle (other secret, same domain).
	foreignIdent := newTestIdentity(t, e.clock, 9, nil)
	fa, err := foreignIdent.CreateAccount(context.Background(), identity.NewAccount{Username: "alice", Password: "correct horse"})
	if err != nil {
		t.Fatal(err)
	}
	foreign, _, err := foreignIdent.IssueSession(context.Background(), fa, "", "")
	if err != nil {
		t.Fatal(err)
	}

	// Tamper: change a signature character and the payload.
	sig := []byte(parts[2])
	if sig[5] == 'A' {
		sig[5] = 'B'
	} else {
		sig[5] = 'A'
	}
	tamperedSig := parts[0] + "." + parts[1] + "." + string(sig)
	var payload map[string]any
	pb, _ := base64.RawURLEncoding.DecodeString(parts[1])
	_ = json.Unmarshal(pb, &payload)
	payload["groups"] = []string{"admins"}
	pb, _ = json.Marshal(payload)
	tamperedPayload := parts[0] + "." + base64.RawURLEncoding.EncodeToString(pb) + "." + parts[2]

	revokedTok, revokedSess := e.session(alice)
	if err := e.ident.RevokeSession(context.Background(), revokedSess.ID); err != nil {
		t.Fatal(err)
	}

	cases := map[string]string{
		"garbage":          "garbage",
		"empty parts":      "..",
		"not base64":       "!!!.???.***",
		"tampered sig":     tamperedSig,
		"tampered payload": tamperedPayload,
		"alg none": forgeToken(map[string]any{"alg": "none", "kid": kid}, claims,
			func(string) []byte { return nil }),
		"alg none no kid": forgeToken(map[string]any{"alg": "none"}, claims, func(string) []byte { return nil }),
		"HS256 with public key": forgeToken(map[string]any{"alg": "HS256", "kid": kid, "typ": "JWT"}, claims,
			hs256(pub)),
		"HS256 with JWKS": forgeToken(map[string]any{"alg": "HS256", "kid": kid}, claims, hs256(e.ident.JWKS())),
		"embedded jwk": forgeToken(map[string]any{"alg": "EdDSA", "kid": "attacker",
			"jwk": map[string]any{"kty": "OKP", "crv": "Ed25519", "x": jwks.Keys[0].X}}, claims,
			func(string) []byte { return make([]byte, 64) }),
		"foreign key": foreign,
		"oversized":   good + strings.Repeat("A", 8<<10),
		"8KiB junk":   strings.Repeat("a", 8<<10),
		"revoked":     revokedTok,
	}
	check := func(name, tok string) {
		t.Helper()
		target := "https://app.ourcircle.net/path/x?q=1&r=%2F"
		// Browser: 302 to the portal's login page with the original URL.
		r, repl := appRequest(target, tok, "text/html,application/xhtml+xml;q=0.9")
		r.Header.Set("Remote-User", "alice")
		next := &nextHandler{}
		w := serve(t, e.gate(nil, nil), r, next)
		if next.called || w.Code != http.StatusFound {
			t.Errorf("%s (browser): status %d, next %v", name, w.Code, next.called)
		}
		wantLoc := "https://ourcircle.net/login?redirect=" + url.QueryEscape(target)
		if got := w.Header().Get("Location"); got != wantLoc {
			t.Errorf("%s: Location %q, want %q", name, got, wantLoc)
		}
		if id, _ := repl.GetString("http.auth.user.id"); id != "" {
			t.Errorf("%s: user id placeholder set", name)
		}
		// API: 401 JSON.
		r, _ = appRequest(target, tok, "application/json")
		next = &nextHandler{}
		w = serve(t, e.gate(nil, nil), r, next)
		if next.called || w.Code != http.StatusUnauthorized {
			t.Errorf("%s (api): status %d, next %v", name, w.Code, next.called)
		}
		if m := decodeJSONBody(t, w); m["error"] == nil {
			t.Errorf("%s: no error in %v", name, m)
		}
	}
	check("no cookie", "")
	for name, tok := range cases {
		check(name, tok)
	}
	// The good token still passes (sanity), then expires.
	if e.gateStatus(good) != 200 {
		t.Fatal("good token refused")
	}
	e.clock.Advance(identity.DefaultSessionTTL + time.Minute)
	check("expired", good)
}

func TestGateRedirectKeepsPort(t *testing.T) {
	e := newTestEnv(t, nil)
	r, _ := appRequest("https://app.ourcircle.net:8443/a?b=c", "", "text/html")
	w := serve(t, e.gate(nil, nil), r, nil)
	want := "https://ourcircle.net:8443/login?redirect=" + url.QueryEscape("https://app.ourcircle.net:8443/a?b=c")
	if w.Code != 302 || w.Header().Get("Location") != want {
		t.Fatalf("%d %q, want %q", w.Code, w.Header().Get("Location"), want)
	}
	// The portal accepts that redirect after login.
	if _, ok := safeRedirect("https://app.ourcircle.net:8443/a?b=c", testDomain); !ok {
		t.Error("portal would refuse the gate's redirect")
	}
}

func TestGatePolicy(t *testing.T) {
	e := newTestEnv(t, nil)
	alice := e.createUser("alice", "correct horse", "family")
	bob := e.createUser("bob", "correct horse", "devs")
	aliceTok, _ := e.session(alice)
	bobTok, _ := e.session(bob)

	for _, tc := range []struct {
		name          string
		groups, users []string
		tok           string
		want          int
	}{
		{"any member", nil, nil, bobTok, 200},
		{"group match", []string{"family"}, nil, aliceTok, 200},
		{"group match case", []string{"FAMILY"}, nil, aliceTok, 200},
		{"group miss", []string{"family"}, nil, bobTok, 403},
		{"user match", nil, []string{"bob"}, bobTok, 200},
		{"user miss", nil, []string{"bob"}, aliceTok, 403},
		{"either", []string{"family"}, []string{"bob"}, bobTok, 200},
	} {
		for _, accept := range []string{"text/html", "application/json"} {
			r, _ := appRequest("https://app.ourcircle.net/", tc.tok, accept)
			next := &nextHandler{}
			w := serve(t, e.gate(tc.groups, tc.users), r, next)
			if w.Code != tc.want || next.called != (tc.want == 200) {
				t.Errorf("%s (%s): status %d next %v, want %d", tc.name, accept, w.Code, next.called, tc.want)
			}
			if tc.want == 403 {
				if !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") ||
					!strings.Contains(w.Body.String(), "not shared with your account") {
					t.Errorf("%s: 403 page: %q %s", tc.name, w.Header().Get("Content-Type"), w.Body)
				}
				checkSecurityHeaders(t, w)
			}
		}
	}
}

func TestAuthCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		want        Auth
		wantErr     bool
	}{
		{"bare", "circle_auth", Auth{}, false},
		{"empty block", "circle_auth {\n}", Auth{}, false},
		{"group", "circle_auth {\n allow group family\n}", Auth{AllowGroups: []string{"family"}}, false},
		{"groups and users", "circle_auth {\n allow group family friends\n allow user alice\n allow group devs\n}",
			Auth{AllowGroups: []string{"family", "friends", "devs"}, AllowUsers: []string{"alice"}}, false},
		{"plural forms", "circle_auth {\n allow groups a\n allow users b c\n}",
			Auth{AllowGroups: []string{"a"}, AllowUsers: []string{"b", "c"}}, false},
		{"allow without kind", "circle_auth {\n allow\n}", Auth{}, true},
		{"allow without names", "circle_auth {\n allow group\n}", Auth{}, true},
		{"allow bad kind", "circle_auth {\n allow everyone x\n}", Auth{}, true},
		{"argument", "circle_auth family", Auth{}, true},
		{"unknown subdirective", "circle_auth {\n deny group x\n}", Auth{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Auth
			err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if err == nil && (!reflect.DeepEqual(g.AllowGroups, tc.want.AllowGroups) || !reflect.DeepEqual(g.AllowUsers, tc.want.AllowUsers)) {
				t.Errorf("got %+v, want %+v", g, tc.want)
			}
		})
	}
}

func TestAuthValidate(t *testing.T) {
	if err := (&Auth{AllowGroups: []string{"a b"}}).Validate(); err == nil {
		t.Error("group with a space accepted")
	}
	if err := (&Auth{AllowUsers: []string{""}}).Validate(); err == nil {
		t.Error("empty username accepted")
	}
	if err := (&Auth{AllowGroups: []string{"family"}, AllowUsers: []string{"alice"}}).Validate(); err != nil {
		t.Error(err)
	}
}

type discardHandler struct{}

func (discardHandler) ServeHTTP(http.ResponseWriter, *http.Request) error { return nil }

// BenchmarkGate measures the gate's hot path: a valid (cached) session.
func BenchmarkGate(b *testing.B) {
	e := newTestEnv(b, nil)
	alice := e.createUser("alice", "correct horse", "family")
	tok, _ := e.session(alice)
	g := e.gate([]string{"family"}, nil)
	r, _ := appRequest("https://app.ourcircle.net/", tok, "text/html")
	r.Header.Set("User-Agent", "bench")
	w := httptest.NewRecorder()
	var next caddyhttp.Handler = discardHandler{}
	if err := g.ServeHTTP(w, r, next); err != nil || w.Code != 200 {
		b.Fatalf("gate: %v %d", err, w.Code)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		_ = g.ServeHTTP(w, r, next)
	}
}

func TestStripSessionCookie(t *testing.T) {
	cases := []struct {
		in   []string
		want []string
	}{
		{[]string{"circle_session=abc"}, nil},
		{[]string{"a=1; circle_session=abc; b=2"}, []string{"a=1; b=2"}},
		{[]string{"a=1", "circle_session=x"}, []string{"a=1"}},
		{[]string{"not_circle_session=1; circle_session_x=2"}, []string{"not_circle_session=1; circle_session_x=2"}},
		{[]string{"grafana_session=z"}, []string{"grafana_session=z"}},
	}
	for _, c := range cases {
		h := http.Header{}
		for _, v := range c.in {
			h.Add("Cookie", v)
		}
		stripSessionCookie(h)
		got := h.Values("Cookie")
		if len(got) != len(c.want) {
			t.Fatalf("%q: got %q, want %q", c.in, got, c.want)
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Fatalf("%q: got %q, want %q", c.in, got, c.want)
			}
		}
	}
}
