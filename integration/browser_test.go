package integration

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// chromiumPath is where Debian's chromium package installs the browser
// (.ci/run installs it).
const chromiumPath = "/usr/bin/chromium"

// browserActionTimeout bounds every single browser action.
const browserActionTimeout = 15 * time.Second

// browser is one headless chromium tab with its own profile.
type browser struct {
	t      *testing.T
	ctx    context.Context
	output *syncBuffer // chromium's stdout and stderr
	shots  []string    // screenshot files written so far
}

// newBrowser starts headless chromium with a fresh profile, trusting the
// TLS certificates whose SubjectPublicKeyInfo hashes are in pins (and no
// others beyond the system's roots). The browser is closed when the test
// ends.
func newBrowser(t *testing.T, parent context.Context, pins []string) *browser {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is missing (CI must install the chromium package): %v", chromiumPath, err)
		}
		t.Skipf("%s is missing: %v (apt-get install chromium)", chromiumPath, err)
	}
	b := &browser{t: t, output: &syncBuffer{}}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-proxy-server", true),
		chromedp.Flag("password-store", "basic"),
		// Honoured only together with --user-data-dir. Chromium matches the
		// list against the certificates the server sends (leaf and
		// intermediates), never against the root, so the pins are the
		// circle CA's intermediates, which the caller has verified in Go
		// to chain to the circle root.
		chromedp.Flag("ignore-certificate-errors-spki-list", strings.Join(pins, ",")),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1000, 800),
		chromedp.CombinedOutput(b.output),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(parent, opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
		if t.Failed() {
			t.Logf("---- chromium output ----\n%s", tail(b.output.String(), 4000))
		}
	})
	b.ctx = ctx
	// Start the browser (and its first tab) now. The first Run must get the
	// tab's own context: chromedp ties the browser's life to the context
	// of the Run that starts it, so a timeout context here would close the
	// browser with it. The bound is a timer instead.
	started := make(chan error, 1)
	go func() { started <- chromedp.Do(ctx, chromedp.Navigate("about:blank")) }()
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("starting %s: %v\n%s", chromiumPath, err, tail(b.output.String(), 4000))
		}
	case <-time.After(browserActionTimeout):
		t.Fatalf("starting %s: not within %v\n%s", chromiumPath, browserActionTimeout, tail(b.output.String(), 4000))
	}
	return b
}

// do runs actions in order, bounded by browserActionTimeout.
func (b *browser) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserActionTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("browser: %s: %v", what, err)
	}
}

// browserRun runs one action that returns a value, bounded by
// browserActionTimeout.
func browserRun[T any](b *browser, what string, a chromedp.Action[T]) T {
	b.t.Helper()
	v, err := browserTry(b, a)
	if err != nil {
		b.t.Fatalf("browser: %s: %v", what, err)
	}
	return v
}

// browserTry is browserRun that returns the error.
func browserTry[T any](b *browser, a chromedp.Action[T]) (T, error) {
	ctx, cancel := context.WithTimeout(b.ctx, browserActionTimeout)
	defer cancel()
	return chromedp.Run(ctx, a)
}

// navigate loads u (following redirects) and returns the final response.
func (b *browser) navigate(u string) *network.Response {
	b.t.Helper()
	return browserRun(b, "open "+u, chromedp.NavigateResponse(u))
}

// submit clicks sel (a submit button) and returns the response of the page
// the form leads to (after redirects).
func (b *browser) submit(what, sel string) *network.Response {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserActionTimeout)
	defer cancel()
	resp, err := chromedp.RunResponse(ctx, chromedp.Click(chromedp.CSS(sel), chromedp.NodeVisible))
	if err != nil {
		b.t.Fatalf("browser: %s: %v", what, err)
	}
	return resp
}

// location is the URL of the page shown now.
func (b *browser) location() string {
	b.t.Helper()
	return browserRun(b, "location", chromedp.Location())
}

// text is the rendered text of the first element matching the CSS
// selector sel, waiting until it is visible.
func (b *browser) text(sel string) string {
	b.t.Helper()
	return browserRun(b, "text of "+sel, chromedp.Text(chromedp.CSS(sel), chromedp.NodeVisible))
}

// screenshot saves a full-page PNG into the test's temp dir and, if
// CIRCLE_SCREENSHOTS names a directory, copies it there too.
func (b *browser) screenshot(dir, name string) {
	b.t.Helper()
	png := browserRun(b, "screenshot "+name, chromedp.FullScreenshot(100))
	p := filepath.Join(dir, name+".png")
	if err := os.WriteFile(p, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.shots = append(b.shots, p)
	if out := os.Getenv("CIRCLE_SCREENSHOTS"); out != "" {
		if err := os.MkdirAll(out, 0o755); err != nil {
			b.t.Fatalf("CIRCLE_SCREENSHOTS: %v", err)
		}
		if err := os.WriteFile(filepath.Join(out, name+".png"), png, 0o644); err != nil {
			b.t.Fatalf("CIRCLE_SCREENSHOTS: %v", err)
		}
	}
}

// sessionCookie returns the browser's circle session cookie for u, or nil.
func (b *browser) sessionCookie(u string) *network.Cookie {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserActionTimeout)
	defer cancel()
	res, err := chromedp.Call(ctx, network.GetCookies, network.GetCookiesParams{URLs: []string{u}})
	if err != nil {
		b.t.Fatalf("browser: cookies of %s: %v", u, err)
	}
	for _, c := range res.Cookies {
		if c.Name == "circle_session" {
			return c
		}
	}
	return nil
}

// pageText is the rendered text of the page, for failure messages.
func (b *browser) pageText() string {
	b.t.Helper()
	s, err := browserTry(b, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
	if err != nil {
		return fmt.Sprintf("(page text: %v)", err)
	}
	return s
}

// appEcho parses the recording app's JSON echo shown by the browser.
func (b *browser) appEcho() map[string]string {
	b.t.Helper()
	// Chromium shows a JSON document as text in a <pre> (its optional
	// pretty-printer may hide it, so read textContent, not the rendering).
	raw := browserRun(b, "app page", chromedp.TextContent(chromedp.CSS("body > pre"), chromedp.NodeReady))
	var got map[string]string
	if err := json.Unmarshal([]byte(raw), &got); err != nil {
		b.t.Fatalf("app page at %s is not the app's JSON echo: %v\n%s", b.location(), err, raw)
	}
	return got
}

// circleSPKIPins verifies in Go, for every node and each host name the
// browser visits, that the served chain verifies to the circle root for
// that name, and returns the base64 SHA-256 SubjectPublicKeyInfo hashes of
// the intermediates in those chains: what chromium is told to accept.
func circleSPKIPins(t *testing.T, c *circle, root *x509.Certificate) []string {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(root)
	var pins []string
	for _, name := range c.order {
		n := c.nodes[name]
		for _, host := range []string{domain, "app." + domain} {
			waitFor(t, 15*time.Second, fmt.Sprintf("%s serves a certificate for %s from the circle CA", n.name, host), func() error {
				d := &net.Dialer{Timeout: 5 * time.Second}
				conn, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", n.httpsPort),
					&tls.Config{RootCAs: pool, ServerName: host})
				if err != nil {
					return err
				}
				defer conn.Close()
				chains := conn.ConnectionState().VerifiedChains
				if len(chains) == 0 {
					return fmt.Errorf("no verified chain")
				}
				chain := chains[0]
				if !chain[len(chain)-1].Equal(root) {
					return fmt.Errorf("chain ends in %s, not the circle root", chain[len(chain)-1].Subject)
				}
				if len(chain) < 3 {
					return fmt.Errorf("chain of %d certificates has no intermediate to pin", len(chain))
				}
				for _, cert := range chain[1 : len(chain)-1] {
					sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
					if pin := base64.StdEncoding.EncodeToString(sum[:]); !slices.Contains(pins, pin) {
						pins = append(pins, pin)
					}
				}
				return nil
			})
		}
	}
	return pins
}

// TestBrowserSingleSignOn drives a real browser (Debian's chromium)
// through a three-node circle: the gate sends it to the portal's login
// form, the session cookie then opens the app on every node's port, the
// account page lists the session and signs out (after which every gate
// refuses the session within 2 s), and a wrong password gets the generic
// message on the form.
func TestBrowserSingleSignOn(t *testing.T) {
	testStart := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := os.Stat(chromiumPath); err != nil && os.Getenv("CI") != "true" {
		t.Skipf("%s is missing: %v (apt-get install chromium)", chromiumPath, err)
	}

	c := newCircle(t, "alpha", "beta", "gamma")
	c.startAll()
	alpha, beta, gamma := c.nodes["alpha"], c.nodes["beta"], c.nodes["gamma"]
	root, err := alpha.rootCA()
	if err != nil {
		t.Fatal(err)
	}
	pins := circleSPKIPins(t, c, root)
	if err := alpha.addUser("ana", "correct horse battery", "family"); err != nil {
		t.Fatal(err)
	}
	// The account must have reached gamma before the browser signs in there.
	loginEventually(t, gamma, "ana", "correct horse battery")
	t.Logf("circle ready after %v", time.Since(testStart).Round(time.Millisecond))

	b := newBrowser(t, ctx, pins)
	shots := t.TempDir()

	// 1. The gate sends the browser to the portal's login form; signing in
	// there lands on the app, which sees the member.
	appURL := gamma.url("app", "/hello")
	resp := b.navigate(appURL)
	loc := b.location()
	wantLogin := gamma.url("", "/login?redirect=")
	if !strings.HasPrefix(loc, wantLogin) || resp.Status != http.StatusOK {
		t.Fatalf("opening %s: at %s (status %d), want the login page %s...", appURL, loc, resp.Status, wantLogin)
	}
	if u, _ := url.Parse(loc); u == nil || u.Query().Get("redirect") != appURL {
		t.Fatalf("login page %s does not carry the app URL %s", loc, appURL)
	}
	b.do("login form visible", chromedp.WaitVisible(chromedp.CSS(`form[action="/login"] input[name="username"]`)))
	if h := b.text("main h2"); h != "Sign in" {
		t.Errorf("login page heading %q, want %q", h, "Sign in")
	}
	b.screenshot(shots, "login")
	b.do("fill the login form",
		chromedp.SendKeys(chromedp.CSS(`input[name="username"]`), "ana"),
		chromedp.SendKeys(chromedp.CSS(`input[name="password"]`), "correct horse battery"),
	)
	resp = b.submit("sign in", `form[action="/login"] button[type="submit"]`)
	if loc := b.location(); loc != appURL || resp.Status != http.StatusOK {
		t.Fatalf("after signing in: at %s (status %d), want %s; page says: %s", loc, resp.Status, appURL, b.pageText())
	}
	if got := b.appEcho(); got["user"] != "ana" || got["groups"] != "family" {
		t.Fatalf("app on gamma saw %v, want user ana in group family", got)
	}
	if h := c.app.lastHeaders(); strings.Contains(strings.Join(h.Values("Cookie"), ";"), "circle_session") {
		t.Fatalf("the circle session cookie reached the app: %v", h.Values("Cookie"))
	}
	ck := b.sessionCookie(appURL)
	if ck == nil {
		t.Fatal("browser holds no circle_session cookie after signing in")
	}
	if strings.TrimPrefix(ck.Domain, ".") != domain || !ck.HTTPOnly || !ck.Secure || ck.SameSite != network.CookieSameSiteLax {
		t.Errorf("session cookie in the browser: domain %q httpOnly %v secure %v sameSite %q; want %s, true, true, Lax",
			ck.Domain, ck.HTTPOnly, ck.Secure, ck.SameSite, domain)
	}
	token := ck.Value

	// 2. The same cookie opens the app on the other nodes' ports: no login.
	for _, n := range []*node{alpha, beta} {
		u := n.url("app", "/hello")
		resp := b.navigate(u)
		if loc := b.location(); loc != u || resp.Status != http.StatusOK {
			t.Fatalf("app on %s: at %s (status %d), want %s without a login", n.name, loc, resp.Status, u)
		}
		if got := b.appEcho(); got["user"] != "ana" {
			t.Fatalf("app on %s saw user %q, want ana", n.name, got["user"])
		}
	}

	// 3. The account page lists the session; signing out there ends it
	// for every app of the circle.
	accountURL := gamma.url("", "/account")
	if resp := b.navigate(accountURL); resp.Status != http.StatusOK || b.location() != accountURL {
		t.Fatalf("account page: at %s (status %d)", b.location(), resp.Status)
	}
	b.do("sessions table visible", chromedp.WaitVisible(chromedp.CSS("main table")))
	if u := b.text("main dl dd strong"); u != "ana" {
		t.Errorf("account page shows username %q, want ana", u)
	}
	rows := browserRun(b, "session rows", chromedp.Evaluate[[]string](
		`Array.from(document.querySelectorAll("main table tbody tr")).map(r => r.innerText)`))
	// Two sessions: the browser's, and the API sign-in of loginEventually.
	var here, other int
	for _, r := range rows {
		switch {
		case strings.Contains(r, "this device") && strings.Contains(r, "Chrome on Linux") && strings.Contains(r, "Sign out"):
			here++
		case !strings.Contains(r, "this device") && strings.Contains(r, "Go-http-client") && strings.Contains(r, "Revoke"):
			other++
		}
	}
	if len(rows) != 2 || here != 1 || other != 1 {
		t.Errorf("sessions listed: %q, want this Chrome session (this device) and the API client's", rows)
	}
	b.screenshot(shots, "account")
	resp = b.submit("sign out", `form[action="/logout"] button[type="submit"]`)
	if loc := b.location(); loc != gamma.url("", "/login?done=signed_out") || resp.Status != http.StatusOK {
		t.Fatalf("after signing out: at %s (status %d)", loc, resp.Status)
	}
	signedOut := time.Now()
	if msg := b.text("main p.msg.ok"); msg != "You are signed out." {
		t.Errorf("notice after signing out %q", msg)
	}
	if ck := b.sessionCookie(appURL); ck != nil && ck.Value != "" {
		t.Errorf("the browser kept its session cookie after signing out: %+v", ck)
	}
	// The browser has dropped the cookie; the token it held must be
	// refused by another node's gate too (the revocation replicates).
	waitFor(t, 2*time.Second, "beta's gate refuses the signed-out session", func() error {
		status, _, err := appStatus(beta, &http.Cookie{Name: "circle_session", Value: token}, "application/json")
		if err != nil {
			return err
		}
		if status != http.StatusUnauthorized {
			return fmt.Errorf("status %d", status)
		}
		return nil
	})
	betaApp := beta.url("app", "/hello")
	waitFor(t, 2*time.Second, "the app on beta sends the browser to the login page", func() error {
		if _, err := browserTry(b, chromedp.NavigateResponse(betaApp)); err != nil {
			return err
		}
		loc, err := browserTry(b, chromedp.Location())
		if err != nil {
			return err
		}
		if !strings.HasPrefix(loc, beta.url("", "/login?redirect=")) {
			return fmt.Errorf("at %s", loc)
		}
		return nil
	})
	t.Logf("signed-out session refused on beta %v after the sign-out page loaded", time.Since(signedOut).Round(time.Millisecond))

	// 4. A wrong password (or an unknown user) gets the generic message on
	// the form with status 401, not an error dump.
	for _, cred := range [][2]string{{"ana", "not the password"}, {"nobody-here", "not the password"}} {
		b.navigate(gamma.url("", "/login"))
		b.do("fill the login form",
			chromedp.WaitVisible(chromedp.CSS(`input[name="username"]`)),
			chromedp.SendKeys(chromedp.CSS(`input[name="username"]`), cred[0]),
			chromedp.SendKeys(chromedp.CSS(`input[name="password"]`), cred[1]),
		)
		resp := b.submit("sign in with a wrong password", `form[action="/login"] button[type="submit"]`)
		if resp.Status != http.StatusUnauthorized {
			t.Errorf("%s with a wrong password: status %d, want 401", cred[0], resp.Status)
		}
		if msg := b.text(`main p.msg.err[role="alert"]`); msg != "Wrong username or password." {
			t.Errorf("%s with a wrong password: message %q", cred[0], msg)
		}
		body := browserRun(b, "page text", chromedp.Text(chromedp.CSS("body")))
		for _, leak := range []string{"goroutine", "panic", ".go:", "runtime error", "identity.", "not found"} {
			if strings.Contains(body, leak) {
				t.Errorf("%s with a wrong password: page shows %q:\n%s", cred[0], leak, body)
			}
		}
		b.do("form shown again", chromedp.WaitVisible(chromedp.CSS(`form[action="/login"] input[name="password"]`)))
		if cred[0] == "ana" {
			b.screenshot(shots, "login-wrong-password")
		}
	}
	if ck := b.sessionCookie(appURL); ck != nil && ck.Value != "" {
		t.Errorf("a failed sign-in set a session cookie")
	}

	t.Logf("screenshots: %s", strings.Join(b.shots, ", "))
	t.Logf("whole test took %v", time.Since(testStart).Round(time.Millisecond))
}
