package caddymodule

import (
	"context"
	"html"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/homecircle/circle/identity"
)

// adminEnv is a test env with an admin (ana, signed in with browser b) and a
// member (bob, with a session token).
type adminEnv struct {
	*testEnv
	ana, bob identity.Account
	b        *browser
	bobToken string
}

func newAdminEnv(t *testing.T) *adminEnv {
	t.Helper()
	e := newTestEnv(t, nil)
	ae := &adminEnv{testEnv: e}
	ae.ana = e.createUser("ana", "correct horse", "admins", "family")
	ae.bob = e.createUser("bob", "battery staple", "family")
	ae.b = e.browser()
	ae.b.login("ana", "correct horse")
	ae.bobToken, _ = e.session(ae.bob)
	return ae
}

// wantBody fails unless the body of w contains every string of want.
func wantBody(t *testing.T, what, body string, want ...string) {
	t.Helper()
	for _, s := range want {
		if !strings.Contains(body, s) {
			t.Errorf("%s: body lacks %q:\n%s", what, s, body)
		}
	}
}

func TestPortalAdminAnonymousRedirect(t *testing.T) {
	e := newTestEnv(t, nil)
	b := e.browser()
	w := b.get("/admin")
	want := "/login?redirect=" + url.QueryEscape("https://"+testDomain+"/admin")
	if w.Code != http.StatusFound || w.Header().Get("Location") != want {
		t.Fatalf("GET /admin anonymous: %d Location %q, want 302 %q", w.Code, w.Header().Get("Location"), want)
	}
	// The portal on another port sends the member back to that port.
	w = b.get("https://" + testDomain + ":8443/admin")
	want = "/login?redirect=" + url.QueryEscape("https://"+testDomain+":8443/admin")
	if w.Code != http.StatusFound || w.Header().Get("Location") != want {
		t.Fatalf("GET :8443/admin anonymous: %d Location %q, want %q", w.Code, w.Header().Get("Location"), want)
	}
	// Actions too (303, as for /account).
	w = b.post("/admin/disable", url.Values{"id": {strings.Repeat("a", 32)}})
	if w.Code != http.StatusSeeOther || !strings.HasPrefix(w.Header().Get("Location"), "/login?redirect=") {
		t.Fatalf("POST /admin/disable anonymous: %d %q", w.Code, w.Header().Get("Location"))
	}
	// A revoked session is no session.
	ae := newAdminEnv(t)
	if err := ae.ident.RevokeAll(context.Background(), ae.ana.ID); err != nil {
		t.Fatal(err)
	}
	if w := ae.b.get("/admin"); w.Code != http.StatusFound {
		t.Fatalf("GET /admin with a revoked session: %d", w.Code)
	}
}

func TestPortalAdminForbiddenForMembers(t *testing.T) {
	ae := newAdminEnv(t)
	bb := ae.browser()
	bb.login("bob", "battery staple")
	w := bb.get("/admin")
	if w.Code != http.StatusForbidden {
		t.Fatalf("GET /admin as a member: %d", w.Code)
	}
	checkSecurityHeaders(t, w)
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("403 Content-Type %q", ct)
	}
	wantBody(t, "403", w.Body.String(), "bob", "admins", `href="/account"`)
	if strings.Contains(w.Body.String(), "ana@example.com") {
		t.Error("403 page lists accounts")
	}
	// Actions are refused too, with a valid CSRF token.
	for _, action := range []string{"disable", "logout-all"} {
		w = bb.post("/admin/"+action, url.Values{"id": {ae.ana.ID}})
		if w.Code != http.StatusForbidden {
			t.Errorf("POST /admin/%s as a member: %d", action, w.Code)
		}
	}
	w = bb.post("/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {"admins"}})
	if w.Code != http.StatusForbidden {
		t.Errorf("POST /admin/groups as a member: %d", w.Code)
	}
	w = bb.post("/admin/invite", url.Values{"groups": {"admins"}, "ttl": {"7d"}})
	if w.Code != http.StatusForbidden || strings.Contains(w.Body.String(), "invite=") {
		t.Errorf("POST /admin/invite as a member: %d", w.Code)
	}
	if a, _ := ae.ident.Account(ae.ana.ID); a.Disabled {
		t.Fatal("a member disabled an admin")
	}
	if a, _ := ae.ident.Account(ae.bob.ID); slices.Contains(a.Groups, "admins") {
		t.Fatal("a member made themself admin")
	}
	if _, err := ae.ident.Verify(ae.bobToken); err != nil {
		t.Fatalf("bob's session: %v", err)
	}
	// Losing the group takes effect at once, whatever the token says.
	if err := ae.ident.SetGroups(context.Background(), ae.ana.ID, []string{"family"}); err != nil {
		t.Fatal(err)
	}
	if w := ae.b.get("/admin"); w.Code != http.StatusForbidden {
		t.Fatalf("GET /admin after leaving admins: %d", w.Code)
	}
}

func TestPortalAdminPageListsAccounts(t *testing.T) {
	ae := newAdminEnv(t)
	if err := ae.ident.SetDisabled(context.Background(), ae.bob.ID, true); err != nil {
		t.Fatal(err)
	}
	w := ae.b.get("/admin")
	if w.Code != http.StatusOK {
		t.Fatalf("GET /admin: %d %s", w.Code, w.Body)
	}
	checkSecurityHeaders(t, w)
	body := w.Body.String()
	wantBody(t, "admin page", body,
		"ana", "Ana", "ana@example.com", "bob", "Bob", "bob@example.com",
		`<span class="tag">admins</span>`, `<span class="tag">family</span>`,
		"disabled", "active", time.Now().UTC().Format("2006"),
		`action="/admin/invite"`, `name="ttl"`, `value="1d"`, `value="3d" selected`, `value="7d"`,
		`action="/admin/groups"`, `action="/admin/enable"`, `action="/admin/logout-all"`,
		`name="id" value="`+ae.bob.ID+`"`, `value="family"`,
	)
	if m := csrfField.FindStringSubmatch(body); m == nil || m[1] != ae.b.cookies[CSRFCookie] {
		t.Errorf("admin forms lack the CSRF token")
	}
	// The admin is not offered to disable themself.
	if strings.Count(body, `action="/admin/disable"`) != 0 {
		t.Errorf("disable offered: %d forms", strings.Count(body, `action="/admin/disable"`))
	}
	if w := ae.b.do(ae.b.request("HEAD", "/admin", nil)); w.Code != http.StatusOK {
		t.Errorf("HEAD /admin: %d", w.Code)
	}
	for _, tc := range []struct {
		method, path string
		status       int
	}{
		{"POST", "/admin", http.StatusMethodNotAllowed},
		{"GET", "/admin/disable", http.StatusMethodNotAllowed},
		{"GET", "/admin/nope", http.StatusNotFound},
		{"POST", "/admin/nope", http.StatusNotFound},
	} {
		if w := ae.b.do(ae.b.request(tc.method, tc.path, nil)); w.Code != tc.status {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, w.Code, tc.status)
		}
	}
}

var inviteURLRe = regexp.MustCompile(`https://[a-z0-9.:]+/register\?invite=[A-Za-z0-9_-]+`)

func TestPortalAdminInvite(t *testing.T) {
	ae := newAdminEnv(t)
	w := ae.b.post("/admin/invite", url.Values{"groups": {" Family, friends ,"}, "ttl": {"1d"}})
	if w.Code != http.StatusOK {
		t.Fatalf("POST /admin/invite: %d %s", w.Code, w.Body)
	}
	checkSecurityHeaders(t, w)
	link := inviteURLRe.FindString(html.UnescapeString(w.Body.String()))
	if !strings.HasPrefix(link, "https://"+testDomain+"/register?invite=") {
		t.Fatalf("no invite link on the page:\n%s", w.Body)
	}
	wantBody(t, "invite", w.Body.String(), "family, friends", "shown only once")
	u, err := url.Parse(link)
	if err != nil {
		t.Fatal(err)
	}
	token := u.Query().Get("invite")
	inv, err := ae.ident.CheckInvite(token)
	if err != nil || !slices.Equal(inv.Groups, []string{"family", "friends"}) {
		t.Fatalf("invite %+v, %v", inv, err)
	}
	// It is shown once: the page does not show it again.
	if w := ae.b.get("/admin"); strings.Contains(w.Body.String(), token) {
		t.Error("GET /admin shows the invite again")
	}
	// It works.
	carol, err := ae.ident.Register(context.Background(), token, identity.NewAccount{Username: "carol", Password: "long enough"})
	if err != nil || !slices.Equal(carol.Groups, []string{"family", "friends"}) {
		t.Fatalf("register with the invite: %+v, %v", carol, err)
	}

	// Valid for the chosen time only.
	w = ae.b.post("/admin/invite", url.Values{"groups": {""}, "ttl": {"1d"}})
	token2 := inviteURLRe.FindString(html.UnescapeString(w.Body.String()))
	if w.Code != http.StatusOK || token2 == "" {
		t.Fatalf("invite without groups: %d", w.Code)
	}
	u, _ = url.Parse(token2)
	token2 = u.Query().Get("invite")
	ae.clock.Advance(25 * time.Hour)
	if _, err := ae.ident.CheckInvite(token2); err == nil {
		t.Error("a 1-day invite is valid after 25h")
	}
	// Need a fresh admin session: the old one may not outlive the clock jump.
	ae.b = ae.browser()
	ae.b.login("ana", "correct horse")
	w = ae.b.post("/admin/invite", url.Values{"groups": {"family"}, "ttl": {"7d"}})
	link = inviteURLRe.FindString(html.UnescapeString(w.Body.String()))
	u, _ = url.Parse(link)
	ae.clock.Advance(6 * 24 * time.Hour)
	if _, err := ae.ident.CheckInvite(u.Query().Get("invite")); err != nil {
		t.Errorf("a 7-day invite after 6 days: %v", err)
	}
}

func TestPortalAdminInviteURLKeepsPort(t *testing.T) {
	ae := newAdminEnv(t)
	// The link comes from the running circle app's portalHost, as the admin API's.
	app := &App{DomainName: testDomain, httpsPort: 8443}
	prev := activeApp.Swap(app)
	t.Cleanup(func() { activeApp.Store(prev) })
	w := ae.b.post("/admin/invite", url.Values{"groups": {"family"}, "ttl": {"3d"}})
	link := inviteURLRe.FindString(html.UnescapeString(w.Body.String()))
	if w.Code != http.StatusOK || !strings.HasPrefix(link, "https://"+testDomain+":8443/register?invite=") {
		t.Fatalf("invite link %q (%d)", link, w.Code)
	}
	u, _ := url.Parse(link)
	if want := (&url.URL{Scheme: "https", Host: app.portalHost(), Path: "/register",
		RawQuery: url.Values{"invite": {u.Query().Get("invite")}}.Encode()}).String(); link != want {
		t.Errorf("link %q, want %q", link, want)
	}
}

func TestPortalAdminEditGroups(t *testing.T) {
	ae := newAdminEnv(t)
	if c, err := ae.ident.Verify(ae.bobToken); err != nil || !slices.Equal(c.Groups, []string{"family"}) {
		t.Fatalf("before: %+v %v", c.Groups, err)
	}
	w := ae.b.post("/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {"family, Media"}})
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/admin?done=groups" {
		t.Fatalf("POST /admin/groups: %d %q %s", w.Code, w.Header().Get("Location"), w.Body)
	}
	c, err := ae.ident.Verify(ae.bobToken)
	if err != nil || !slices.Equal(c.Groups, []string{"family", "media"}) {
		t.Fatalf("bob's token after the edit: %+v %v", c.Groups, err)
	}
	if w := ae.b.get(w.Header().Get("Location")); w.Code != 200 || !strings.Contains(w.Body.String(), "groups were saved") {
		t.Errorf("notice after the edit: %d", w.Code)
	}
	// A gate for group media lets bob in now.
	r := httptest.NewRequest("GET", "https://app."+testDomain+"/", nil)
	r.AddCookie(&http.Cookie{Name: SessionCookie, Value: ae.bobToken})
	if w := serve(t, ae.gate([]string{"media"}, nil), r, nil); w.Code != http.StatusOK {
		t.Errorf("gate for media: %d", w.Code)
	}
	// Empty: no groups.
	if w := ae.b.post("/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {""}}); w.Code != http.StatusSeeOther {
		t.Fatalf("clearing groups: %d", w.Code)
	}
	if c, err := ae.ident.Verify(ae.bobToken); err != nil || len(c.Groups) != 0 {
		t.Fatalf("after clearing: %+v %v", c.Groups, err)
	}
	// The admin may change their own groups, keeping admins.
	if w := ae.b.post("/admin/groups", url.Values{"id": {ae.ana.ID}, "groups": {"admins, music"}}); w.Code != http.StatusSeeOther {
		t.Fatalf("own groups keeping admins: %d %s", w.Code, w.Body)
	}
	if a, _ := ae.ident.Account(ae.ana.ID); !slices.Equal(a.Groups, []string{"admins", "music"}) {
		t.Fatalf("ana's groups %v", a.Groups)
	}
}

func TestPortalAdminDisableAndSignOut(t *testing.T) {
	ae := newAdminEnv(t)
	ctx := context.Background()
	w := ae.b.post("/admin/disable", url.Values{"id": {ae.bob.ID}})
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/admin?done=disabled" {
		t.Fatalf("POST /admin/disable: %d %q %s", w.Code, w.Header().Get("Location"), w.Body)
	}
	if _, err := ae.ident.Verify(ae.bobToken); err == nil {
		t.Fatal("bob's session survived disabling")
	}
	if ae.gateStatus(ae.bobToken) != http.StatusUnauthorized {
		t.Error("the gate lets a disabled member in")
	}
	if _, err := ae.ident.Login(ctx, "bob", "battery staple", "192.0.2.9"); err == nil {
		t.Fatal("a disabled member can sign in")
	}
	if w := ae.b.get("/admin?done=disabled"); !strings.Contains(w.Body.String(), "disabled and signed out") ||
		!strings.Contains(w.Body.String(), `action="/admin/enable"`) {
		t.Errorf("admin page after disabling: %d", w.Code)
	}

	if w := ae.b.post("/admin/enable", url.Values{"id": {ae.bob.ID}}); w.Code != http.StatusSeeOther {
		t.Fatalf("POST /admin/enable: %d %s", w.Code, w.Body)
	}
	if _, err := ae.ident.Verify(ae.bobToken); err == nil {
		t.Fatal("enabling brought the old session back")
	}
	if _, err := ae.ident.Login(ctx, "bob", "battery staple", "192.0.2.9"); err != nil {
		t.Fatalf("bob after enabling: %v", err)
	}

	// Sign out everywhere, without disabling.
	ae.clock.Advance(2 * time.Second) // tokens of the second of a revocation are issued for the next one
	tok1, _ := ae.session(ae.bob)
	tok2, _ := ae.session(ae.bob)
	w = ae.b.post("/admin/logout-all", url.Values{"id": {ae.bob.ID}})
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/admin?done=logout-all" {
		t.Fatalf("POST /admin/logout-all: %d %q", w.Code, w.Header().Get("Location"))
	}
	for _, tok := range []string{tok1, tok2} {
		if _, err := ae.ident.Verify(tok); err == nil {
			t.Error("a session survived sign out everywhere")
		}
	}
	if a, _ := ae.ident.Account(ae.bob.ID); a.Disabled {
		t.Error("sign out everywhere disabled the account")
	}
	// The admin is still signed in.
	if w := ae.b.get("/admin"); w.Code != http.StatusOK {
		t.Fatalf("admin after signing bob out: %d", w.Code)
	}
	// Signing themself out everywhere ends the admin's session too.
	w = ae.b.post("/admin/logout-all", url.Values{"id": {ae.ana.ID}})
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login?done=signed_out" {
		t.Fatalf("own logout-all: %d %q", w.Code, w.Header().Get("Location"))
	}
	if w := ae.b.get("/admin"); w.Code != http.StatusFound {
		t.Fatalf("admin page after own logout-all: %d", w.Code)
	}
}

func TestPortalAdminCSRF(t *testing.T) {
	ae := newAdminEnv(t)
	for _, tc := range []struct {
		name  string
		vals  url.Values
		setup func(*http.Request)
	}{
		{"missing", url.Values{"id": {ae.bob.ID}}, func(r *http.Request) {}},
		{"forged", url.Values{"id": {ae.bob.ID}, "csrf": {strings.Repeat("A", csrfLen)}}, nil},
		{"empty", url.Values{"id": {ae.bob.ID}, "csrf": {""}}, nil},
		{"cross-origin", url.Values{"id": {ae.bob.ID}}, func(r *http.Request) { r.Header.Set("Origin", "https://evil.example") }},
		{"cross-site", url.Values{"id": {ae.bob.ID}}, func(r *http.Request) { r.Header.Set("Sec-Fetch-Site", "cross-site") }},
		{"subdomain origin", url.Values{"id": {ae.bob.ID}}, func(r *http.Request) { r.Header.Set("Origin", "https://app."+testDomain) }},
	} {
		var w interface{ Result() *http.Response }
		if tc.setup == nil {
			w = ae.b.post("/admin/disable", tc.vals)
		} else {
			vals := tc.vals
			if tc.name != "missing" {
				vals.Set("csrf", ae.b.csrf())
			}
			r := ae.b.request("POST", "/admin/disable", strings.NewReader(vals.Encode()))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			r.Header.Set("Origin", "https://"+testDomain)
			tc.setup(r)
			w = ae.b.do(r)
		}
		if code := w.Result().StatusCode; code != http.StatusForbidden {
			t.Errorf("%s: status %d, want 403", tc.name, code)
		}
		if a, _ := ae.ident.Account(ae.bob.ID); a.Disabled {
			t.Fatalf("%s: bob was disabled", tc.name)
		}
	}
	if _, err := ae.ident.Verify(ae.bobToken); err != nil {
		t.Fatalf("bob's session after refused forms: %v", err)
	}
	// Same for the invite and groups forms.
	if w := ae.b.post("/admin/invite", url.Values{"csrf": {"x"}, "ttl": {"1d"}}); w.Code != http.StatusForbidden || inviteURLRe.MatchString(w.Body.String()) {
		t.Errorf("invite with a bad token: %d", w.Code)
	}
	if w := ae.b.post("/admin/groups", url.Values{"csrf": {"x"}, "id": {ae.bob.ID}, "groups": {"admins"}}); w.Code != http.StatusForbidden {
		t.Errorf("groups with a bad token: %d", w.Code)
	}
	if a, _ := ae.ident.Account(ae.bob.ID); slices.Contains(a.Groups, "admins") {
		t.Fatal("groups changed with a bad token")
	}
}

func TestPortalAdminCannotLockThemselfOut(t *testing.T) {
	ae := newAdminEnv(t)
	w := ae.b.post("/admin/disable", url.Values{"id": {ae.ana.ID}})
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "cannot disable your own account") {
		t.Fatalf("self-disable: %d %s", w.Code, w.Body)
	}
	for _, groups := range []string{"family", "", "admin, family", " , "} {
		w = ae.b.post("/admin/groups", url.Values{"id": {ae.ana.ID}, "groups": {groups}})
		if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "cannot remove yourself") {
			t.Errorf("own groups %q: %d", groups, w.Code)
		}
	}
	a, _ := ae.ident.Account(ae.ana.ID)
	if a.Disabled || !slices.Equal(a.Groups, []string{"admins", "family"}) {
		t.Fatalf("ana after refused changes: %+v", a)
	}
	if w := ae.b.get("/admin"); w.Code != http.StatusOK {
		t.Fatalf("admin page: %d", w.Code)
	}
	// Another admin can.
	zoe := ae.createUser("zoe", "correct horse", "admins")
	zb := ae.browser()
	zb.login("zoe", "correct horse")
	if w := zb.post("/admin/groups", url.Values{"id": {ae.ana.ID}, "groups": {"family"}}); w.Code != http.StatusSeeOther {
		t.Fatalf("zoe removes ana from admins: %d %s", w.Code, w.Body)
	}
	if w := ae.b.get("/admin"); w.Code != http.StatusForbidden {
		t.Errorf("ana after losing admins: %d", w.Code)
	}
	_ = zoe
}

func TestPortalAdminBadInput(t *testing.T) {
	ae := newAdminEnv(t)
	unknownID := strings.Repeat("0", 32)
	for _, tc := range []struct {
		path string
		vals url.Values
		msg  string
	}{
		{"/admin/disable", url.Values{}, "does not exist"},
		{"/admin/disable", url.Values{"id": {"zzz"}}, "does not exist"},
		{"/admin/disable", url.Values{"id": {unknownID}}, "does not exist"},
		{"/admin/enable", url.Values{"id": {strings.Repeat("x", 20000)}}, "does not exist"},
		{"/admin/logout-all", url.Values{"id": {"../../etc/passwd"}}, "does not exist"},
		{"/admin/groups", url.Values{"id": {strings.ToUpper(ae.bob.ID)}, "groups": {"x"}}, "does not exist"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}}, "no groups field"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {"<script>alert(1)</script>"}}, "comma-separated"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {"has space"}}, "comma-separated"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {strings.Repeat("g", 65)}}, "comma-separated"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {strings.Repeat("g,", 70) + "h"}}, "comma-separated"},
		{"/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {"caf\xe9"}}, "comma-separated"},
		{"/admin/invite", url.Values{"groups": {"family"}}, "how long"},
		{"/admin/invite", url.Values{"groups": {"family"}, "ttl": {"forever"}}, "how long"},
		{"/admin/invite", url.Values{"groups": {"family"}, "ttl": {"-1d"}}, "how long"},
		{"/admin/invite", url.Values{"groups": {"no way!"}, "ttl": {"1d"}}, "comma-separated"},
	} {
		w := ae.b.post(tc.path, tc.vals)
		if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), tc.msg) {
			t.Errorf("%s %v: %d, want 400 with %q", tc.path, tc.vals, w.Code, tc.msg)
			continue
		}
		if strings.Contains(w.Body.String(), "<script>alert") {
			t.Errorf("%s: input echoed unescaped", tc.path)
		}
		// The page is still the admin page, with the list.
		wantBody(t, tc.path, w.Body.String(), `role="alert"`, "bob@example.com")
	}
	// The invite form keeps what was typed after an error.
	w := ae.b.post("/admin/invite", url.Values{"groups": {"family, no way!"}, "ttl": {"7d"}})
	wantBody(t, "invite error", w.Body.String(), `value="family, no way!"`, `value="7d" selected`)

	a, _ := ae.ident.Account(ae.bob.ID)
	if a.Disabled || !slices.Equal(a.Groups, []string{"family"}) {
		t.Fatalf("bob after bad input: %+v", a)
	}
	// Not a form at all.
	r := ae.b.request("POST", "/admin/disable", strings.NewReader(`{"id":"`+ae.bob.ID+`"}`))
	r.Header.Set("Content-Type", "application/json")
	if w := ae.b.do(r); w.Code != http.StatusUnsupportedMediaType {
		t.Errorf("JSON body: %d", w.Code)
	}
	// Too large.
	if w := ae.b.post("/admin/groups", url.Values{"id": {ae.bob.ID}, "groups": {strings.Repeat("a", 70<<10)}}); w.Code != http.StatusRequestEntityTooLarge {
		t.Errorf("large body: %d", w.Code)
	}
}
