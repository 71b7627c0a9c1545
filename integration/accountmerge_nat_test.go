package integration

// Issue 8, "No lost updates on accounts", with real caddy processes: two
// reachable nodes r and r2 on the simulated internet (the NAT harness
// without NATed members), cut from each other with a netlab partition
// while the client x reaches both.

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// postForm posts a portal form with a session cookie and a fresh
// double-submit CSRF token; it returns the status and the Location.
func (c *webClient) postForm(path string, session *http.Cookie, form url.Values) (int, string, error) {
	b := make([]byte, 32)
	rand.Read(b)
	csrf := base64.RawURLEncoding.EncodeToString(b)
	form.Set("csrf", csrf)
	req, err := http.NewRequest("POST", webURL("", path), strings.NewReader(form.Encode()))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.AddCookie(session)
	req.AddCookie(&http.Cookie{Name: "circle_csrf", Value: csrf})
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Location"), nil
}

// TestNATDisableSurvivesPasswordChange is the acceptance check: during a
// split an admin disables carol on r (portal /admin/disable); later carol
// changes her password on r2 (portal /account/password) and signs in there
// again. After the heal carol is disabled on every node: no password logs
// her in and every session, from before or during the split, is refused
// everywhere.
func TestNATDisableSurvivesPasswordChange(t *testing.T) {
	l := newNATLab(t, natSpec{members: []string{}, r2: true})
	l.start()
	r, r2 := l.nodes["r"], l.nodes["r2"]
	if err := r.addUser("root", "root-password-1", "admins"); err != nil {
		t.Fatal(err)
	}
	var carol struct{ ID string }
	if err := r.admin("POST", "/circle/users", map[string]any{"username": "carol", "password": "carol-old-password"}, &carol); err != nil {
		t.Fatal(err)
	}
	r2.waitAccounts(30*time.Second, 2)
	webR, webR2 := r.publicWeb(), r2.publicWeb()
	webs := map[string]*webClient{"r": webR, "r2": webR2}
	admin := loginOnce(t, webR, "r", "root", "root-password-1")
	sessions := map[string]*http.Cookie{ // carol's sessions, by where they were made
		"before the split on r":  loginOnce(t, webR, "r", "carol", "carol-old-password"),
		"before the split on r2": loginOnce(t, webR2, "r2", "carol", "carol-old-password"),
	}

	// The split. Both sides must have noticed it, or the writes below
	// would wait for the other side's acknowledgement. Memberlist's
	// failure detection sets this bound; it is generous.
	l.lab.Partition(r.ns, r2.ns)
	for _, n := range []*natNode{r, r2} {
		waitEvery(t, 45*time.Second, 250*time.Millisecond, n.name+" alone", func() error {
			st, err := n.status()
			if err != nil {
				return err
			}
			if got := st.alive(); len(got) != 1 {
				return fmt.Errorf("%s sees %v alive", n.name, got)
			}
			return nil
		})
	}
	if status, loc, err := webR.postForm("/admin/disable", admin, url.Values{"id": {carol.ID}}); err != nil || status != http.StatusSeeOther || !strings.Contains(loc, "done=disabled") {
		t.Fatalf("disable on r: %d %q %v", status, loc, err)
	}
	disabledAt := time.Now()
	// The scenario: two seconds later, on the other side. This is
	// the scenario's timing, not synchronisation: the disable revoked
	// carol's sessions up to its second, and the session carol makes
	// below must come after that second, or the revocation alone would
	// refuse it and hide a lost disable.
	time.Sleep(time.Until(disabledAt.Add(2 * time.Second)))
	sessR2 := sessions["before the split on r2"]
	if status, loc, err := webR2.postForm("/account/password", sessR2, url.Values{"current": {"carol-old-password"}, "new": {"carol-new-password"}}); err != nil || status != http.StatusSeeOther || !strings.Contains(loc, "done=password") {
		t.Fatalf("password change on r2: %d %q %v", status, loc, err)
	}
	sessions["during the split on r2"] = loginOnce(t, webR2, "r2", "carol", "carol-new-password")

	// The heal. The bound for merging is 30 s after connectivity
	// returns; rejoining is other work of the issue, so this waits twice
	// that and reports the time.
	l.lab.Heal(r.ns, r2.ns)
	healed := time.Now()
	l.waitAlive(60*time.Second, "r", "r2")
	t.Logf("r and r2 together %v after the heal", time.Since(healed).Round(time.Millisecond))
	waitEvery(t, 60*time.Second, 500*time.Millisecond, "carol's sessions refused everywhere", func() error {
		for where, ck := range sessions {
			for name, c := range webs {
				status, _, _, err := c.get(webURL("", "/api/me"), ck, nil)
				if err != nil {
					return err
				}
				if status != http.StatusUnauthorized {
					return fmt.Errorf("%s: carol's session made %s: /api/me %d", name, where, status)
				}
			}
		}
		return nil
	})
	t.Logf("every session refused on every node %v after the heal", time.Since(healed).Round(time.Millisecond))
	for name, c := range webs {
		for _, pw := range []string{"carol-old-password", "carol-new-password"} {
			if _, status, _ := c.login("carol", pw); status != http.StatusUnauthorized {
				t.Errorf("%s: carol with %s after the heal: %d, want 401", name, pw, status)
			}
		}
	}
}
