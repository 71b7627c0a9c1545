package integration

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// waitEvery polls cond every interval until it returns nil or within
// passes. Login polls use a slow interval so they never trip throttling.
func waitEvery(t *testing.T, within, every time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(every)
	}
}

// loginEventually logs in on n, retrying while the account may still be
// on its way to n.
func loginEventually(t *testing.T, n *node, user, pass string) *http.Cookie {
	t.Helper()
	var c *http.Cookie
	waitEvery(t, 10*time.Second, 300*time.Millisecond, "login "+user+" on "+n.name, func() error {
		var err error
		c, _, err = n.apiLogin(user, pass)
		return err
	})
	return c
}

// openApp requests the gated app on n as an API client with a forged
// Remote-User header, and checks the app saw the real identity.
func openApp(t *testing.T, n *node, cookie *http.Cookie, wantUser string) {
	t.Helper()
	status, body, _, err := n.get(n.url("app", "/whoami"), cookie, map[string]string{
		"Accept": "application/json", "Remote-User": "mallory", "remote-groups": "admins", "Remote-Email": "x@evil.example",
	})
	if err != nil {
		t.Fatalf("app on %s: %v", n.name, err)
	}
	if status != http.StatusOK {
		t.Fatalf("app on %s: status %d, body %s", n.name, status, body)
	}
	var got map[string]string
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("app body %q: %v", body, err)
	}
	if got["user"] != wantUser {
		t.Fatalf("app on %s saw Remote-User %q, want %q", n.name, got["user"], wantUser)
	}
	h := n.c.app.lastHeaders()
	for _, v := range h.Values("Remote-User") {
		if v == "mallory" {
			t.Fatalf("client-supplied Remote-User reached the app: %v", h)
		}
	}
	if strings.Contains(strings.Join(h.Values("Cookie"), ";"), "circle_session") {
		t.Fatalf("the circle session cookie reached the app: %v", h.Values("Cookie"))
	}
	if len(h.Values("Remote-User")) != 1 {
		t.Fatalf("app saw Remote-User %v, want exactly one value", h.Values("Remote-User"))
	}
	if strings.Contains(h.Get("Remote-Groups"), "admins") || strings.Contains(h.Get("Remote-Email"), "evil") {
		t.Fatalf("client-supplied identity headers reached the app: %v", h)
	}
}

// appStatus requests the gated app on n with cookie and Accept.
func appStatus(n *node, cookie *http.Cookie, accept string) (int, http.Header, error) {
	status, _, hdr, err := n.get(n.url("app", "/whoami"), cookie, map[string]string{"Accept": accept})
	return status, hdr, err
}

// TestThreeNodesSingleSignOn is the first acceptance point: a user added
// on alpha logs in through beta and that cookie opens a gated app on gamma
// with the identity headers; forged headers never reach the app. Logout
// on beta is then refused by gamma's gate within 2 s, and bad cookies are
// refused by the real binary.
func TestThreeNodesSingleSignOn(t *testing.T) {
	c := newCircle(t, "alpha", "beta", "gamma")
	c.startAll()
	alpha, beta, gamma := c.nodes["alpha"], c.nodes["beta"], c.nodes["gamma"]

	// One internal CA for the whole circle, shared through storage circle.
	rootA, err := alpha.rootCA()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node{beta, gamma} {
		waitFor(t, 10*time.Second, n.name+" serves alpha's root", func() error {
			r, err := n.rootCA()
			if err != nil {
				return err
			}
			if !r.Equal(rootA) {
				return fmt.Errorf("root %s differs from alpha's %s", r.Subject, rootA.Subject)
			}
			return nil
		})
	}

	if err := alpha.addUser("ana", "correct horse battery", "family", "friends"); err != nil {
		t.Fatal(err)
	}
	cookie := loginEventually(t, beta, "ana", "correct horse battery")
	if cookie.Domain != domain && cookie.Domain != "."+domain {
		t.Errorf("session cookie domain %q, want %q", cookie.Domain, domain)
	}
	if !cookie.Secure || !cookie.HttpOnly || cookie.SameSite != http.SameSiteLaxMode || cookie.Path != "/" {
		t.Errorf("session cookie attributes: %+v", cookie)
	}

	openApp(t, gamma, cookie, "ana")
	h := c.app.lastHeaders()
	if g := h.Get("Remote-Groups"); g != "family,friends" && g != "friends,family" {
		t.Errorf("Remote-Groups %q, want family and friends", g)
	}

	t.Run("no cookie", func(t *testing.T) {
		status, hdr, err := appStatus(gamma, nil, "text/html,application/xhtml+xml")
		if err != nil {
			t.Fatal(err)
		}
		loc := hdr.Get("Location")
		if status != http.StatusFound || !strings.HasPrefix(loc, "https://"+domain) || !strings.Contains(loc, "/login?redirect=") {
			t.Fatalf("browser without session: %d %q, want 302 to the portal login", status, loc)
		}
		u, err := url.Parse(loc)
		if err != nil {
			t.Fatal(err)
		}
		if r := u.Query().Get("redirect"); !strings.HasPrefix(r, "https://app."+domain) || !strings.Contains(r, "/whoami") {
			t.Fatalf("redirect parameter %q does not carry the original URL", r)
		}
		status, _, err = appStatus(gamma, nil, "application/json")
		if err != nil {
			t.Fatal(err)
		}
		if status != http.StatusUnauthorized {
			t.Fatalf("API client without session: %d, want 401", status)
		}
	})

	t.Run("bad cookies", func(t *testing.T) {
		parts := strings.Split(cookie.Value, ".")
		if len(parts) != 3 {
			t.Fatalf("session cookie is not a compact JWS: %q", cookie.Value)
		}
		tamperedPayload := parts[0] + "." + flipMiddle(parts[1]) + "." + parts[2]
		noneHeader := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","kid":"x"}`))
		bad := map[string]string{
			"garbage":          "not-a-token",
			"empty parts":      "..",
			"tampered payload": tamperedPayload,
			"tampered sig":     parts[0] + "." + parts[1] + "." + flipMiddle(parts[2]),
			"alg none":         noneHeader + "." + parts[1] + ".",
			"oversized":        strings.Repeat("a", 3500) + "." + parts[1] + "." + parts[2],
			"binary":           "\x00\xff\x01",
		}
		for name, v := range bad {
			for _, accept := range []string{"text/html", "application/json"} {
				status, _, err := appStatus(gamma, &http.Cookie{Name: "circle_session", Value: url.QueryEscape(v)}, accept)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				want := http.StatusUnauthorized
				if accept == "text/html" {
					want = http.StatusFound
				}
				if status != want {
					t.Errorf("%s cookie (%s): status %d, want %d", name, accept, status, want)
				}
			}
		}
	})

	t.Run("policy", func(t *testing.T) {
		if err := alpha.addUser("otto", "another fine password"); err != nil {
			t.Fatal(err)
		}
		oc := loginEventually(t, gamma, "otto", "another fine password")
		status, _, _, err := gamma.get(gamma.url("family", "/"), oc, map[string]string{"Accept": "text/html"})
		if err != nil {
			t.Fatal(err)
		}
		if status != http.StatusForbidden {
			t.Fatalf("member outside group family: %d, want 403", status)
		}
		status, _, _, err = gamma.get(gamma.url("family", "/"), cookie, map[string]string{"Accept": "text/html"})
		if err != nil || status != http.StatusOK {
			t.Fatalf("family member: %d %v, want 200", status, err)
		}
	})

	t.Run("same answer for unknown user and wrong password", func(t *testing.T) {
		_, s1, _ := beta.apiLogin("ana", "wrong password!")
		_, s2, _ := beta.apiLogin("nobody-here", "wrong password!")
		if s1 != http.StatusUnauthorized || s2 != http.StatusUnauthorized {
			t.Fatalf("wrong password %d, unknown user %d; want 401 for both", s1, s2)
		}
	})

	t.Run("logout is refused everywhere within 2s", func(t *testing.T) {
		lc := loginEventually(t, beta, "ana", "correct horse battery")
		openApp(t, gamma, lc, "ana")
		req, _ := http.NewRequest("POST", beta.url("", "/api/logout"), strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.AddCookie(&http.Cookie{Name: lc.Name, Value: lc.Value})
		req.Header.Set("Origin", "https://"+domain+fmt.Sprintf(":%d", beta.httpsPort))
		resp, err := beta.client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			t.Fatalf("logout: %d", resp.StatusCode)
		}
		loggedOut := time.Now()
		waitFor(t, 2*time.Second, "gamma refuses the logged-out session", func() error {
			status, _, err := appStatus(gamma, lc, "application/json")
			if err != nil {
				return err
			}
			if status != http.StatusUnauthorized {
				return fmt.Errorf("status %d", status)
			}
			return nil
		})
		t.Logf("revocation reached gamma's gate %v after logout returned", time.Since(loggedOut).Round(time.Millisecond))
		// The other session of the same member is untouched.
		openApp(t, gamma, cookie, "ana")
	})

	t.Run("throttling", func(t *testing.T) {
		var last int
		var retry string
		for i := 0; i < 40; i++ {
			b, _ := json.Marshal(map[string]string{"username": "otto", "password": "nope nope nope"})
			req, _ := http.NewRequest("POST", alpha.url("", "/api/login"), bytes.NewReader(b))
			req.Header.Set("Content-Type", "application/json")
			resp, err := alpha.client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			last, retry = resp.StatusCode, resp.Header.Get("Retry-After")
			if last == http.StatusTooManyRequests {
				break
			}
			if last != http.StatusUnauthorized {
				t.Fatalf("failed login %d: status %d", i, last)
			}
		}
		if last != http.StatusTooManyRequests || retry == "" {
			t.Fatalf("40 failed logins: last status %d, Retry-After %q; want 429 with Retry-After", last, retry)
		}
	})
}

// flipMiddle changes the middle base64url character of s. (Not the last
// one: its low bits can be padding, so flipping it may not change the
// decoded bytes at all.)
func flipMiddle(s string) string {
	if s == "" {
		return "A"
	}
	i := len(s) / 2
	repl := byte('A')
	if s[i] == 'A' {
		repl = 'B'
	}
	return s[:i] + string(repl) + s[i+1:]
}

var csrfField = regexp.MustCompile(`name="csrf"[^>]*value="([^"]+)"|value="([^"]+)"[^>]*name="csrf"`)

// register redeems an invite through the portal's HTML form on n.
func register(t *testing.T, n *node, inviteURL, username, password string) {
	t.Helper()
	u, err := url.Parse(inviteURL)
	if err != nil {
		t.Fatal(err)
	}
	token := u.Query().Get("invite")
	if token == "" {
		t.Fatalf("invite URL without token: %q", inviteURL)
	}
	cl := n.client()
	formURL := n.url("", "/register?invite="+url.QueryEscape(token))
	resp, err := cl.Get(formURL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := csrfField.FindSubmatch(body)
	if resp.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("register form: %d, csrf found %v\n%s", resp.StatusCode, m != nil, body)
	}
	csrf := string(m[1]) + string(m[2])
	form := url.Values{"username": {username}, "password": {password}, "csrf": {strings.ReplaceAll(csrf, "&#43;", "+")},
		"invite": {token}, "name": {"Cy"}, "email": {"cy@example.com"}}
	req, _ := http.NewRequest("POST", formURL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", fmt.Sprintf("https://%s:%d", domain, n.httpsPort))
	resp, err = cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("register: status %d, want 303\n%s", resp.StatusCode, body)
	}
}

// TestSurvivesSigkillAfterAck: alpha is killed right after acknowledging
// a registration (replicas 2); the account is on beta and gamma, the member
// logs in on beta, an existing session still opens apps on gamma, and alpha
// catches up on what was written while it was down.
func TestSurvivesSigkillAfterAck(t *testing.T) {
	c := newCircle(t, "alpha", "beta", "gamma")
	c.startAll()
	alpha, beta, gamma := c.nodes["alpha"], c.nodes["beta"], c.nodes["gamma"]

	if err := alpha.addUser("bo", "bo's long password"); err != nil {
		t.Fatal(err)
	}
	boCookie, _, err := alpha.apiLogin("bo", "bo's long password")
	if err != nil {
		t.Fatal(err)
	}
	var inv struct {
		URL string `json:"url"`
	}
	if err := alpha.admin("POST", "/circle/invites", map[string]any{"groups": []string{"family"}, "ttl": "1h"}, &inv); err != nil {
		t.Fatal(err)
	}
	register(t, alpha, inv.URL, "cy", "cy's long password")
	alpha.kill() // right after the acknowledgement

	// replicas 2: the account was on a second node before the 303; the
	// third gets it by broadcast or anti-entropy.
	for _, n := range []*node{beta, gamma} {
		loginEventually(t, n, "cy", "cy's long password")
	}
	openApp(t, gamma, boCookie, "bo")

	// Written while alpha is down.
	if err := beta.addUser("dee", "dee's long password"); err != nil {
		t.Fatal(err)
	}
	// Status tells the truth about the dead node (memberlist suspicion
	// capped at ~8 s in a small circle).
	killed := time.Now()
	beta.waitMembers(2)
	t.Logf("beta reported alpha down %v after the kill", time.Since(killed).Round(100*time.Millisecond))

	alpha.start()
	alpha.waitMembers(3)
	loginEventually(t, alpha, "dee", "dee's long password")
	loginEventually(t, alpha, "cy", "cy's long password")
}

// jwtKid returns the kid header of a compact JWS.
func jwtKid(t *testing.T, token string) string {
	t.Helper()
	h, err := base64.RawURLEncoding.DecodeString(strings.Split(token, ".")[0])
	if err != nil {
		t.Fatalf("token header: %v", err)
	}
	var hdr struct {
		Kid string `json:"kid"`
		Alg string `json:"alg"`
	}
	if err := json.Unmarshal(h, &hdr); err != nil {
		t.Fatal(err)
	}
	if hdr.Alg != "EdDSA" {
		t.Fatalf("token alg %q, want EdDSA", hdr.Alg)
	}
	return hdr.Kid
}

// TestKeyRotationWhileDown: a node that was down while the signing key
// rotated verifies tokens signed with the new key after it rejoins.
func TestKeyRotationWhileDown(t *testing.T) {
	c := newCircle(t, "alpha", "beta", "gamma")
	c.startAll()
	alpha, gamma := c.nodes["alpha"], c.nodes["gamma"]
	if err := alpha.addUser("eve", "eve's long password"); err != nil {
		t.Fatal(err)
	}
	before := loginEventually(t, alpha, "eve", "eve's long password")
	openApp(t, gamma, before, "eve")

	gamma.kill()
	if err := alpha.admin("POST", "/circle/rotate-key", nil, nil); err != nil {
		t.Fatal(err)
	}
	after := loginEventually(t, alpha, "eve", "eve's long password")
	if jwtKid(t, after.Value) == jwtKid(t, before.Value) {
		t.Fatalf("token after rotation still signed with kid %s", jwtKid(t, before.Value))
	}

	gamma.start()
	gamma.waitMembers(3)
	waitFor(t, 15*time.Second, "gamma verifies the new key's tokens", func() error {
		status, _, err := appStatus(gamma, after, "application/json")
		if err != nil {
			return err
		}
		if status != http.StatusOK {
			return fmt.Errorf("status %d", status)
		}
		return nil
	})
	// Old tokens keep verifying until they expire.
	openApp(t, gamma, before, "eve")
}

// TestWrongSecretCannotJoin: a node with another circle secret neither
// joins nor reads anything.
func TestWrongSecretCannotJoin(t *testing.T) {
	c := newCircle(t, "alpha", "beta")
	c.startAll()
	alpha := c.nodes["alpha"]
	if err := alpha.addUser("fay", "fay's long password"); err != nil {
		t.Fatal(err)
	}

	mallory := c.addNode("mallory", newSecretFile(t))
	mallory.join = []int{alpha.gossip, c.nodes["beta"].gossip}
	mallory.start()

	// Give mallory's join attempts time to happen (its join loop retries),
	// observing alpha throughout: it must never see a third member.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		alive, err := alpha.aliveMembers()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range alive {
			if m == "mallory" {
				t.Fatalf("mallory joined with a wrong secret: %v", alive)
			}
		}
		malive, err := mallory.aliveMembers()
		if err != nil {
			t.Fatal(err)
		}
		if len(malive) != 1 {
			t.Fatalf("mallory sees members %v", malive)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, status, err := mallory.apiLogin("fay", "fay's long password"); err == nil || status != http.StatusUnauthorized {
		t.Fatalf("login on mallory: status %d err %v; want 401", status, err)
	}
}
