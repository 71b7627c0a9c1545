package identity

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

var b64 = base64.RawURLEncoding

// rawToken builds a compact JWS from a header and payload with sign over
// the signing input.
func rawToken(t testing.TB, header, payload any, sign func(input []byte) []byte) string {
	t.Helper()
	hb, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	input := b64.EncodeToString(hb) + "." + b64.EncodeToString(pb)
	return input + "." + b64.EncodeToString(sign([]byte(input)))
}

func edSigner(priv ed25519.PrivateKey) func([]byte) []byte {
	return func(in []byte) []byte { return ed25519.Sign(priv, in) }
}

// circleSigner signs with the service's current private key (to build
// validly signed tokens with bad claims).
func circleSigner(t testing.TB, s *Service) (string, func([]byte) []byte) {
	t.Helper()
	s.keysMu.RLock()
	k := s.signing
	s.keysMu.RUnlock()
	raw, err := s.store.Get(bucketKeys, k.kid)
	if err != nil {
		t.Fatal(err)
	}
	var rec keyRecord
	_ = json.Unmarshal(raw, &rec)
	ns := s.seal.NonceSize()
	seed, err := s.seal.Open(nil, rec.Sealed[:ns], rec.Sealed[ns:], sealAAD(k.kid))
	if err != nil {
		t.Fatal(err)
	}
	return k.kid, edSigner(ed25519.NewKeyFromSeed(seed))
}

func decodePart(t testing.TB, tok string, i int) map[string]any {
	t.Helper()
	b, err := b64.DecodeString(strings.Split(tok, ".")[i])
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestTokenFormat(t *testing.T) {
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1", "family")
	tok, sess := mustIssue(t, s, a)
	h := decodePart(t, tok, 0)
	p := decodePart(t, tok, 1)
	if h["alg"] != "EdDSA" || h["kid"] == nil || h["jwk"] != nil {
		t.Fatalf("header %v", h)
	}
	now := clock.Now()
	if p["iss"] != "https://ourcircle.net" || p["sub"] != a.ID || p["sid"] != sess.ID ||
		p["iat"] != float64(now.Unix()) || p["exp"] != float64(now.Add(DefaultSessionTTL).Unix()) ||
		p["username"] != "alice" || p["name"] != "N alice" || p["email"] != "alice@example.com" {
		t.Fatalf("payload %v", p)
	}
	if g, _ := p["groups"].([]any); len(g) != 1 || g[0] != "family" {
		t.Fatalf("groups %v", p["groups"])
	}
	if sess.AccountID != a.ID || sess.UserAgent != "test-agent" || sess.IP != "192.0.2.1" || !sess.Expires.Equal(now.Add(DefaultSessionTTL)) {
		t.Fatalf("session %+v", sess)
	}
	c, err := s.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	want := Claims{Issuer: "https://ourcircle.net", Subject: a.ID, SessionID: sess.ID, IssuedAt: now, Expiry: now.Add(DefaultSessionTTL),
		Username: "alice", Name: "N alice", Email: "alice@example.com", Groups: []string{"family"}}
	if !c.IssuedAt.Equal(want.IssuedAt) || !c.Expiry.Equal(want.Expiry) || c.Issuer != want.Issuer || c.Subject != want.Subject ||
		c.SessionID != want.SessionID || c.Username != want.Username || c.Name != want.Name || c.Email != want.Email ||
		strings.Join(c.Groups, ",") != "family" {
		t.Fatalf("claims %+v, want %+v", c, want)
	}

	// Verifiable with the published JWKS by a third party.
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(s.JWKS(), &set); err != nil {
		t.Fatal(err)
	}
	jws, err := jose.ParseSignedCompact(tok, []jose.SignatureAlgorithm{jose.EdDSA})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jws.Verify(set); err != nil {
		t.Fatalf("JWKS does not verify the token: %v", err)
	}
}

func TestJWKSFormat(t *testing.T) {
	s := newTestService(t, nil, nil)
	var doc struct {
		Keys []map[string]string `json:"keys"`
	}
	if err := json.Unmarshal(s.JWKS(), &doc); err != nil || len(doc.Keys) != 1 {
		t.Fatalf("jwks %s: %v", s.JWKS(), err)
	}
	k := doc.Keys[0]
	if k["kty"] != "OKP" || k["crv"] != "Ed25519" || k["use"] != "sig" || k["alg"] != "EdDSA" || k["kid"] == "" || k["x"] == "" || k["d"] != "" {
		t.Fatalf("jwk %v", k)
	}
	j := s.JWKS()
	j[0] = 'X'
	if s.JWKS()[0] != '{' {
		t.Fatal("JWKS returned internal storage")
	}
}

func TestVerifyAdversarial(t *testing.T) {
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1")
	good, sess := mustIssue(t, s, a)
	kid, sign := circleSigner(t, s)
	now := clock.Now()
	claims := func(mod func(p *tokenPayload)) tokenPayload {
		p := tokenPayload{Iss: s.Issuer(), Sub: a.ID, Sid: sess.ID, Iat: now.Unix(), Exp: now.Add(time.Hour).Unix(), Username: "alice"}
		if mod != nil {
			mod(&p)
		}
		return p
	}
	hdr := map[string]any{"alg": "EdDSA", "kid": kid}
	_, foreign, _ := ed25519.GenerateKey(nil)
	pub := s.keys[kid].pub
	parts := strings.Split(good, ".")

	// Sanity: the helper makes tokens the service accepts.
	if _, err := s.Verify(rawToken(t, hdr, claims(nil), sign)); err != nil {
		t.Fatalf("control token rejected: %v", err)
	}

	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}
	hs256 := func(key []byte) func([]byte) []byte {
		return func(in []byte) []byte {
			m := hmac.New(sha256.New, key)
			m.Write(in)
			return m.Sum(nil)
		}
	}
	foreignJWK, _ := json.Marshal(jose.JSONWebKey{Key: foreign.Public(), Algorithm: "EdDSA"})
	var foreignJWKMap map[string]any
	_ = json.Unmarshal(foreignJWK, &foreignJWKMap)

	for _, tc := range []struct {
		name  string
		token string
		want  error
	}{
		{"empty", "", ErrInvalidToken},
		{"garbage", "not a token", ErrInvalidToken},
		{"three dots of garbage", "a.b.c", ErrInvalidToken},
		{"two parts", parts[0] + "." + parts[1], ErrInvalidToken},
		{"four parts", good + ".x", ErrInvalidToken},
		{"oversized", good + "." + strings.Repeat("A", maxTokenBytes), ErrInvalidToken},
		{"oversized valid prefix", strings.Repeat(" ", maxTokenBytes) + good, ErrInvalidToken},
		{"alg none", rawToken(t, map[string]any{"alg": "none", "kid": kid}, claims(nil), func([]byte) []byte { return nil }), ErrInvalidToken},
		{"alg none no sig part", parts[0] + "." + parts[1] + ".", ErrInvalidToken},
		{"HS256 with public key bytes", rawToken(t, map[string]any{"alg": "HS256", "kid": kid}, claims(nil), hs256(pub)), ErrInvalidToken},
		{"HS256 with JWKS bytes", rawToken(t, map[string]any{"alg": "HS256", "kid": kid}, claims(nil), hs256(s.JWKS())), ErrInvalidToken},
		{"tampered payload", parts[0] + "." + b64.EncodeToString(mustJSON(t, claims(func(p *tokenPayload) { p.Groups = []string{"admins"} }))) + "." + parts[2], ErrInvalidToken},
		{"tampered signature", parts[0] + "." + parts[1] + "." + flip(parts[2], 5), ErrInvalidToken},
		{"tampered header", flip(parts[0], 3) + "." + parts[1] + "." + parts[2], ErrInvalidToken},
		{"foreign key same kid", rawToken(t, hdr, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"foreign key with jku", rawToken(t, map[string]any{"alg": "EdDSA", "kid": "evil", "jku": "https://evil.example/jwks.json"}, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"foreign key with jku and our kid", rawToken(t, map[string]any{"alg": "EdDSA", "kid": kid, "jku": "https://evil.example/jwks.json"}, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"foreign key with x5u", rawToken(t, map[string]any{"alg": "EdDSA", "kid": kid, "x5u": "https://evil.example/cert.pem"}, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"embedded jwk no kid", rawToken(t, map[string]any{"alg": "EdDSA", "jwk": foreignJWKMap}, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"embedded jwk our kid", rawToken(t, map[string]any{"alg": "EdDSA", "kid": kid, "jwk": foreignJWKMap}, claims(nil), edSigner(foreign)), ErrInvalidToken},
		{"unknown kid", rawToken(t, map[string]any{"alg": "EdDSA", "kid": "0000000000000000"}, claims(nil), sign), ErrInvalidToken},
		{"no kid", rawToken(t, map[string]any{"alg": "EdDSA"}, claims(nil), sign), ErrInvalidToken},
		{"huge kid", rawToken(t, map[string]any{"alg": "EdDSA", "kid": strings.Repeat("k", 100)}, claims(nil), sign), ErrInvalidToken},
		{"unknown crit", rawToken(t, map[string]any{"alg": "EdDSA", "kid": kid, "crit": []string{"exp"}, "exp": 1}, claims(nil), sign), ErrInvalidToken},
		{"wrong issuer", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Iss = "https://evil.example" }), sign), ErrInvalidToken},
		{"issuer without scheme", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Iss = "ourcircle.net" }), sign), ErrInvalidToken},
		{"no sub", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Sub = "" }), sign), ErrInvalidToken},
		{"bad sub", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Sub = "../x" }), sign), ErrInvalidToken},
		{"no sid", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Sid = "" }), sign), ErrInvalidToken},
		{"no exp", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Exp = 0 }), sign), ErrInvalidToken},
		{"no iat", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Iat = 0 }), sign), ErrInvalidToken},
		{"iat in the future", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Iat = now.Add(time.Hour).Unix() }), sign), ErrInvalidToken},
		{"expired", rawToken(t, hdr, claims(func(p *tokenPayload) { p.Exp = now.Unix() }), sign), ErrExpired},
		{"payload not JSON", rawToken(t, hdr, "just a string", sign), ErrInvalidToken},
		{"JSON serialization", `{"payload":"` + parts[1] + `","protected":"` + parts[0] + `","signature":"` + parts[2] + `"}`, ErrInvalidToken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := s.Verify(tc.token); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := s.Verify(good); err != nil {
		t.Fatalf("good token rejected after the attacks: %v", err)
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVerifyExpiry(t *testing.T) {
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1")
	tok, _ := mustIssue(t, s, a)
	if _, err := s.Verify(tok); err != nil { // now cached
		t.Fatal(err)
	}
	clock.Advance(DefaultSessionTTL - time.Second)
	if _, err := s.Verify(tok); err != nil {
		t.Fatalf("just before expiry: %v", err)
	}
	clock.Advance(time.Second)
	if _, err := s.Verify(tok); !errors.Is(err, ErrExpired) {
		t.Fatalf("cached, expired: %v", err)
	}
	if _, err := s.Verify(tok); !errors.Is(err, ErrExpired) {
		t.Fatalf("uncached, expired: %v", err)
	}
}

func TestIssueSessionErrors(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil)
	a := mustCreate(t, s, "alice", "password1")
	if _, _, err := s.IssueSession(ctx, Account{ID: strings.Repeat("a", 32)}, "", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown account: %v", err)
	}
	if err := s.SetDisabled(ctx, a.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.IssueSession(ctx, a, "", ""); !errors.Is(err, ErrDisabled) {
		t.Fatalf("disabled: %v", err)
	}
	// Not started: no key.
	store := NewMemStore()
	ns, err := New(store, testConfig(newClock()))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ns.CreateAccount(ctx, NewAccount{Username: "bob", Password: "password1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ns.IssueSession(ctx, b, "", ""); !errors.Is(err, ErrNotStarted) {
		t.Fatalf("not started: %v", err)
	}
	// Long user agent is cut without splitting a character.
	_, sess, err := s.IssueSession(ctx, mustCreate(t, s, "carol", "password1"), strings.Repeat("é", 200), "192.0.2.1")
	if err != nil || len(sess.UserAgent) > maxUserAgent || !strings.HasPrefix(strings.Repeat("é", 200), sess.UserAgent) {
		t.Fatalf("user agent %q %v", sess.UserAgent, err)
	}
}

func TestRevocation(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1")
	b := mustCreate(t, s, "bob", "password1")
	t1, s1 := mustIssue(t, s, a)
	t2, _ := mustIssue(t, s, a)
	tb, _ := mustIssue(t, s, b)
	for _, tok := range []string{t1, t2, tb} {
		if _, err := s.Verify(tok); err != nil { // cache them
			t.Fatal(err)
		}
	}
	if got, _ := s.Sessions(a.ID); len(got) != 2 {
		t.Fatalf("sessions %v", got)
	}

	if err := s.RevokeSession(ctx, s1.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(t1); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked session: %v", err)
	}
	if _, err := s.Verify(t2); err != nil {
		t.Fatalf("other session: %v", err)
	}
	if _, err := s.Session(s1.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("session record not deleted: %v", err)
	}
	if got, _ := s.Sessions(a.ID); len(got) != 1 {
		t.Fatalf("sessions after revoke %v", got)
	}
	if err := s.RevokeSession(ctx, "never-existed"); err != nil {
		t.Fatalf("revoking unknown session: %v", err)
	}
	if err := s.RevokeSession(ctx, ""); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("empty sid: %v", err)
	}

	// Log out everywhere, then log in again in the same second.
	if err := s.RevokeAll(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(t2); !errors.Is(err, ErrRevoked) {
		t.Fatalf("after RevokeAll: %v", err)
	}
	if _, err := s.Verify(tb); err != nil {
		t.Fatalf("other account affected: %v", err)
	}
	t3, s3 := mustIssue(t, s, a)
	if _, err := s.Verify(t3); err != nil {
		t.Fatalf("new session right after RevokeAll: %v", err)
	}
	if got, _ := s.Sessions(a.ID); len(got) != 1 || got[0].ID != s3.ID {
		t.Fatalf("sessions after RevokeAll %v", got)
	}
	if err := s.RevokeAll(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RevokeAll bad id: %v", err)
	}

	// Disabling revokes; re-enabling does not resurrect.
	if err := s.SetDisabled(ctx, b.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(tb); !errors.Is(err, ErrRevoked) {
		t.Fatalf("disabled account: %v", err)
	}
	if err := s.SetDisabled(ctx, b.ID, false); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Second)
	if _, err := s.Verify(tb); !errors.Is(err, ErrRevoked) {
		t.Fatalf("re-enabled account, old token: %v", err)
	}
	tb2, _ := mustIssue(t, s, b)
	if _, err := s.Verify(tb2); err != nil {
		t.Fatalf("re-enabled account, new token: %v", err)
	}
}

// TestRevocationAcrossNodes: a revocation made on one node purges the other
// node's cache (through the watch).
func TestRevocationAcrossNodes(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s1 := newTestService(t, store, clock)
	s2 := newTestService(t, store, clock)
	a := mustCreate(t, s1, "alice", "password1")
	tok, sess := mustIssue(t, s1, a)
	tok2, _ := mustIssue(t, s1, a)
	for _, tk := range []string{tok, tok2} {
		if _, err := s2.Verify(tk); err != nil {
			t.Fatal(err)
		}
	}
	if s2.cache.len() != 2 {
		t.Fatalf("cache len %d", s2.cache.len())
	}
	if err := s1.RevokeSession(ctx, sess.ID); err != nil {
		t.Fatal(err)
	}
	eventually(t, "revocation to reach node 2", func() bool {
		_, err := s2.Verify(tok)
		return errors.Is(err, ErrRevoked)
	})
	if _, err := s2.Verify(tok2); err != nil {
		t.Fatalf("unrelated token: %v", err)
	}
	// Group change on node 1 shows on node 2 at once.
	if err := s1.SetGroups(ctx, a.ID, []string{"admins"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "group change to reach node 2", func() bool {
		c, err := s2.Verify(tok2)
		return err == nil && len(c.Groups) == 1 && c.Groups[0] == "admins"
	})
	if err := s1.SetDisabled(ctx, a.ID, true); err != nil {
		t.Fatal(err)
	}
	eventually(t, "disable to reach node 2", func() bool {
		_, err := s2.Verify(tok2)
		return errors.Is(err, ErrRevoked)
	})
	// A restarted node still knows the revocations.
	s3 := newTestService(t, store, clock)
	if _, err := s3.Verify(tok); !errors.Is(err, ErrRevoked) {
		t.Fatalf("fresh node: %v", err)
	}
}

func TestVerifyCache(t *testing.T) {
	s := newTestService(t, nil, nil, func(c *Config) { c.CacheSize = 5 })
	a := mustCreate(t, s, "alice", "password1")
	var toks []string
	for range 20 {
		tok, _ := mustIssue(t, s, a)
		toks = append(toks, tok)
	}
	for round := range 2 {
		for _, tok := range toks {
			if _, err := s.Verify(tok); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
	}
	if n := s.cache.len(); n != 5 {
		t.Fatalf("cache holds %d, bound 5", n)
	}
	// A cache hit does not allocate.
	if allocs := testing.AllocsPerRun(100, func() { _, _ = s.Verify(toks[19]) }); allocs > 0 {
		t.Fatalf("cache hit allocates %v times", allocs)
	}

	// Disabled cache.
	ns := newTestService(t, nil, nil, func(c *Config) { c.CacheSize = -1 })
	b := mustCreate(t, ns, "bob", "password1")
	tok, _ := mustIssue(t, ns, b)
	for range 3 {
		if _, err := ns.Verify(tok); err != nil {
			t.Fatal(err)
		}
	}
	if ns.cache.len() != 0 {
		t.Fatal("disabled cache holds entries")
	}
}

// TestCachePutAfterPurge: a verification that raced a revocation does not
// repopulate the cache with a stale result.
func TestCachePutAfterPurge(t *testing.T) {
	c := newTokenCache(10)
	k := [32]byte{1}
	gen := c.generation()
	c.purge(func(*Claims) bool { return true })
	c.put(&k, Claims{Subject: "x"}, gen)
	if _, ok := c.get(&k); ok {
		t.Fatal("stale put was cached")
	}
	c.put(&k, Claims{Subject: "x"}, c.generation())
	if _, ok := c.get(&k); !ok {
		t.Fatal("fresh put was not cached")
	}
}

func TestSessionsList(t *testing.T) {
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1")
	b := mustCreate(t, s, "bob", "password1")
	_, first := mustIssue(t, s, a)
	clock.Advance(time.Hour)
	_, second := mustIssue(t, s, a)
	mustIssue(t, s, b)
	got, err := s.Sessions(a.ID)
	if err != nil || len(got) != 2 || got[0].ID != first.ID || got[1].ID != second.ID {
		t.Fatalf("sessions %+v %v", got, err)
	}
	clock.Advance(DefaultSessionTTL - 30*time.Minute) // first expired, second not
	if got, _ := s.Sessions(a.ID); len(got) != 1 || got[0].ID != second.ID {
		t.Fatalf("after expiry %+v", got)
	}
	if got, _ := s.Sessions(strings.Repeat("0", 32)); len(got) != 0 {
		t.Fatalf("unknown account %+v", got)
	}
}

func TestPolicy(t *testing.T) {
	member := Claims{Subject: "id", Username: "alice", Groups: []string{"family", "friends"}}
	for _, tc := range []struct {
		name string
		p    Policy
		c    Claims
		want bool
	}{
		{"empty allows member", Policy{}, member, true},
		{"empty refuses anonymous", Policy{}, Claims{}, false},
		{"user match", Policy{Users: []string{"bob", "Alice"}}, member, true},
		{"user mismatch", Policy{Users: []string{"bob"}}, member, false},
		{"group match", Policy{Groups: []string{"FAMILY"}}, member, true},
		{"group mismatch", Policy{Groups: []string{"admins"}}, member, false},
		{"either", Policy{Users: []string{"bob"}, Groups: []string{"friends"}}, member, true},
		{"anonymous with groups", Policy{Groups: []string{"family"}}, Claims{Groups: []string{"family"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.p.Allows(tc.c); got != tc.want {
				t.Fatalf("Allows = %v, want %v", got, tc.want)
			}
		})
	}
}

func BenchmarkVerifyCached(b *testing.B) {
	s := newTestService(b, nil, nil)
	a := mustCreate(b, s, "alice", "password1", "family")
	tok, _ := mustIssue(b, s, a)
	if _, err := s.Verify(tok); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Verify(tok); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkVerifyUncached(b *testing.B) {
	s := newTestService(b, nil, nil, func(c *Config) { c.CacheSize = -1 })
	a := mustCreate(b, s, "alice", "password1", "family")
	tok, _ := mustIssue(b, s, a)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}
