package caddymodule

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

const testDomain = "ourcircle.net"

func TestSafeRedirect(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		// accepted
		{"https://ourcircle.net/account", true},
		{"https://ourcircle.net", true},
		{"https://app.ourcircle.net/x?y=1#z", true},
		{"https://deep.app.ourcircle.net/", true},
		{"HTTPS://App.OurCircle.net/path", true},
		{"https://app.ourcircle.net:8443/x", true},
		{"https://ourcircle.net?next=https://evil.example", true},
		{"/account", true},
		{"/", true},
		{"/a/b?c=d#e", true},
		{"/%41ccount", true},

		// refused
		{"", false},
		{"//evil.example", false},
		{"///evil.example", false},
		{"https://evil.example", false},
		{"https://evil.example/", false},
		{"https:evil.example", false},
		{"https:/evil.example", false},
		{"https:///evil.example", false},
		{"http://ourcircle.net/", false},
		{"http://app.ourcircle.net/", false},
		{"ftp://ourcircle.net/", false},
		{"/\\evil.example", false},
		{"\\/evil.example", false},
		{"\\\\evil.example", false},
		{"https://ourcircle.net\\@evil.example", false},
		{"https:\\\\evil.example", false},
		{"javascript:alert(1)", false},
		{"JavaScript:alert(1)", false},
		{"data:text/html,hi", false},
		{"https://ourcircle.net@evil.example", false},
		{"https://ourcircle.net:443@evil.example", false},
		{"https://user:pw@ourcircle.net/", false},
		{"https://evil.example#.ourcircle.net", false},
		{"https://evil.example?.ourcircle.net", false},
		{"https://evil.example/.ourcircle.net", false},
		{"https://evilourcircle.net/", false},
		{"https://ourcircle.net.evil.example/", false},
		{"https://ourcircle.net./", false},
		{"https://app..ourcircle.net/", false},
		{"https://.ourcircle.net/", false},
		{"https://ourcircle.net:/", false},
		{"https://ourcircle.net:99999999/", false},
		{"https://ourcircle.net:44a3/", false},
		{"https://[::1]/", false},
		{"https://evil.example%2f.ourcircle.net/", false},
		{"https://evil.example%23.ourcircle.net/", false},
		{"https://ourcircle.net%40evil.example/", false},
		{"%2F%2Fevil.example", false},
		{"/%2F%2Fevil.example", false},
		{"/%2f/evil.example", false},
		{"/%5Cevil.example", false},
		{"/%5cevil.example", false},
		{"/%252F%252Fevil.example", false},
		{"/%25252F%25252Fevil.example", false},
		{"/\t/evil.example", false},
		{"/\n/evil.example", false},
		{"/\r\nLocation: https://evil.example", false},
		{" /account", false},
		{"/ /evil", false},
		{"https://ourcircle.net\t.evil.example/", false},
		{"https://ourcircle.net/\x00", false},
		{"account", false},
		{"evil.example", false},
		{"https://app.ourcircle.net/" + strings.Repeat("a", 3000), false},
	} {
		got, ok := safeRedirect(tc.in, testDomain)
		if ok != tc.ok {
			t.Errorf("safeRedirect(%q) ok = %v, want %v", tc.in, ok, tc.ok)
			continue
		}
		if ok && got != tc.in {
			t.Errorf("safeRedirect(%q) = %q, want it unchanged", tc.in, got)
		}
	}
}

// browserResolve resolves a redirect target the way a lenient browser
// might: tabs and newlines stripped, backslashes read as slashes.
func browserResolve(base *url.URL, target string) (*url.URL, error) {
	t := strings.NewReplacer("\t", "", "\n", "", "\r", "", "\\", "/").Replace(target)
	ref, err := url.Parse(t)
	if err != nil {
		return nil, err
	}
	return base.ResolveReference(ref), nil
}

func FuzzRedirect(f *testing.F) {
	for _, s := range []string{
		"https://ourcircle.net/account", "https://app.ourcircle.net:8443/x", "/account", "/",
		"//evil.example", "https:evil.example", "/\\evil.example", "javascript:alert(1)",
		"https://ourcircle.net@evil.example", "https://evil.example#.ourcircle.net",
		"https://evilourcircle.net", "/%2F%2Fevil.example", "/%5Cevil", "https://ourcircle.net%2F@evil",
		"HTTPS://APP.OURCIRCLE.NET", "https://a.ourcircle.net:1/..//evil.example",
	} {
		f.Add(s)
	}
	base, _ := url.Parse("https://ourcircle.net/login")
	f.Fuzz(func(t *testing.T, in string) {
		got, ok := safeRedirect(in, testDomain)
		if !ok {
			return
		}
		if got != in {
			t.Fatalf("accepted %q changed to %q", in, got)
		}
		for _, resolve := range []func(string) (*url.URL, error){
			func(s string) (*url.URL, error) { return url.Parse(s) },
			func(s string) (*url.URL, error) { return browserResolve(base, s) },
		} {
			u, err := resolve(got)
			if err != nil {
				t.Fatalf("accepted %q does not parse: %v", got, err)
			}
			if u.Scheme != "" && !strings.EqualFold(u.Scheme, "https") {
				t.Fatalf("accepted %q has scheme %q", got, u.Scheme)
			}
			if u.User != nil {
				t.Fatalf("accepted %q has userinfo", got)
			}
			if u.Host == "" {
				if u.Scheme != "" {
					t.Fatalf("accepted %q: absolute without host", got)
				}
				continue // relative, stays on the portal
			}
			if h := strings.ToLower(u.Hostname()); !inDomain(h, testDomain) {
				t.Fatalf("accepted %q resolves to host %q", got, h)
			}
		}
	})
}

func TestInDomain(t *testing.T) {
	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{"ourcircle.net", true}, {"a.ourcircle.net", true}, {"a.b.ourcircle.net", true},
		{"evilourcircle.net", false}, {"ourcircle.net.evil", false}, {"", false}, {".ourcircle.net", false},
		{"net", false},
	} {
		if got := inDomain(tc.host, testDomain); got != tc.ok {
			t.Errorf("inDomain(%q) = %v", tc.host, got)
		}
	}
}

func TestSessionCookieAttributes(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c := sessionCookie(testDomain, "tok", now.Add(30*24*time.Hour), now)
	w := httptest.NewRecorder()
	http.SetCookie(w, c)
	got := w.Header().Get("Set-Cookie")
	for _, want := range []string{
		"circle_session=tok", "Path=/", "Domain=ourcircle.net", "Max-Age=2592000",
		"HttpOnly", "Secure", "SameSite=Lax",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Set-Cookie %q lacks %q", got, want)
		}
	}

	w = httptest.NewRecorder()
	http.SetCookie(w, clearSessionCookie(testDomain))
	got = w.Header().Get("Set-Cookie")
	for _, want := range []string{"circle_session=;", "Max-Age=0", "Domain=ourcircle.net", "Secure", "HttpOnly"} {
		if !strings.Contains(got, want) {
			t.Errorf("clearing Set-Cookie %q lacks %q", got, want)
		}
	}
}

func TestPortalOrigin(t *testing.T) {
	for host, want := range map[string]string{
		"app.ourcircle.net":      "https://ourcircle.net",
		"app.ourcircle.net:443":  "https://ourcircle.net",
		"app.ourcircle.net:8443": "https://ourcircle.net:8443",
		"ourcircle.net:8441":     "https://ourcircle.net:8441",
	} {
		r := httptest.NewRequest("GET", "https://"+host+"/", nil)
		if got := portalOrigin(testDomain, r); got != want {
			t.Errorf("portalOrigin(%q) = %q, want %q", host, got, want)
		}
	}
}
