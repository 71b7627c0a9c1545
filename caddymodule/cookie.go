package caddymodule

import (
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Cookie names.
const (
	// SessionCookie is the session cookie (contract): a compact JWS issued
	// by identity, scoped to the circle domain so every app subdomain sees
	// it. Secure; HttpOnly; SameSite=Lax; Path=/; Domain=<circle domain>.
	SessionCookie = "circle_session"

	// CSRFCookie holds the per-browser CSRF secret of the portal's forms
	// (double-submit: every form carries the same value in its "csrf"
	// field). It is host-only (no Domain attribute), so it is sent only to
	// the portal; see Portal for how cookie tossing from a subdomain is
	// handled.
	CSRFCookie = "circle_csrf"
)

// maxCookieToken is the longest session cookie value the gate and the portal
// pass to identity. Longer values are refused without parsing. (identity
// refuses tokens over 4 KiB too; this keeps the check on our side.)
const maxCookieToken = 4096

// maxRedirectLen is the longest redirect target accepted.
const maxRedirectLen = 2048

// sessionCookie returns the session cookie for token, valid until expires.
// Max-Age is derived from expires (at least one second).
func sessionCookie(domain, token string, expires, now time.Time) *http.Cookie {
	maxAge := int(expires.Sub(now) / time.Second)
	if maxAge < 1 {
		maxAge = 1
	}
	return &http.Cookie{
		Name:     SessionCookie,
		Value:    token,
		Path:     "/",
		Domain:   domain,
		MaxAge:   maxAge,
		Expires:  expires.UTC().Truncate(time.Second),
		Secure:   true,
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
	}
}

// clearSessionCookie returns a cookie that deletes the session cookie.
func clearSessionCookie(domain string) *http.Cookie {
	return &http.Cookie{
		Name:     SessionCookie,
		Value:    "",
		Path:     "/",
		Domain:   domain,
		MaxAge:   -1,
		Expires:  time.Unix(0, 0),
		Secure:   true,
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
	}
}

// sessionToken returns the session token of the request ("" if there is
// none or it is too long to be one of ours). It does one cookie lookup.
func sessionToken(r *http.Request) string {
	c, err := r.Cookie(SessionCookie)
	if err != nil || len(c.Value) > maxCookieToken {
		return ""
	}
	return c.Value
}

// inDomain reports whether host (a lowercase hostname without port) is the
// circle domain or one of its subdomains.
func inDomain(host, domain string) bool {
	if domain == "" || host == "" {
		return false
	}
	if host == domain {
		return true
	}
	return len(host) > len(domain)+1 &&
		host[len(host)-len(domain)-1] == '.' &&
		host[len(host)-len(domain):] == domain
}

// validHostname reports whether h consists only of the characters of a DNS
// name (letters, digits, '-', '.'), with no empty label.
func validHostname(h string) bool {
	if h == "" || len(h) > 253 || h[0] == '.' || h[len(h)-1] == '.' || strings.Contains(h, "..") {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.':
		default:
			return false
		}
	}
	return true
}

// validPort reports whether p is empty or a decimal port number.
func validPort(p string) bool {
	if len(p) > 5 {
		return false
	}
	for i := 0; i < len(p); i++ {
		if p[i] < '0' || p[i] > '9' {
			return false
		}
	}
	return true
}

// safeRedirect validates a post-login redirect target against the circle
// domain (lowercase). It accepts only:
//
//   - https URLs ("https://" literally, scheme in any case) without
//     userinfo, whose host is the domain or a subdomain of it, with an
//     optional port (e.g. https://app.circle.localhost:8443/x?y#z);
//   - relative paths starting with a single "/" (not "//" and not "/\"),
//     also after percent-decoding.
//
// Anything with control characters, whitespace, backslashes or percent
// signs in the authority is refused, so that no browser-side normalisation
// (which strips tabs and newlines and reads '\' as '/') can turn an
// accepted value into another host. It returns the value unchanged when it
// is accepted.
func safeRedirect(raw, domain string) (string, bool) {
	if raw == "" || len(raw) > maxRedirectLen || domain == "" {
		return "", false
	}
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c <= ' ' || c == 0x7f || c == '\\' {
			return "", false
		}
	}
	if raw[0] == '/' {
		if !safeRelative(raw) {
			return "", false
		}
		return raw, true
	}
	const scheme = "https://"
	if len(raw) <= len(scheme) || !strings.EqualFold(raw[:len(scheme)], scheme) {
		return "", false
	}
	rest := raw[len(scheme):]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	authority := rest[:end]
	if authority == "" || strings.ContainsAny(authority, "@%[]") {
		return "", false
	}
	host, port := authority, ""
	if i := strings.LastIndexByte(authority, ':'); i >= 0 {
		host, port = authority[:i], authority[i+1:]
		if port == "" {
			return "", false
		}
	}
	if !validPort(port) || !validHostname(host) || !inDomain(strings.ToLower(host), domain) {
		return "", false
	}
	// Cross-check with the standard parser: it must see the same host.
	u, err := url.Parse(raw)
	if err != nil || u.User != nil || u.Opaque != "" || !strings.EqualFold(u.Host, authority) {
		return "", false
	}
	return raw, true
}

// safeRelative reports whether a path-absolute reference stays on the
// current origin: it must start with exactly one '/', and repeated
// percent-decoding must not produce "//", "/\" or control characters at
// its start.
func safeRelative(p string) bool {
	for range 3 {
		if len(p) == 0 || p[0] != '/' {
			return false
		}
		if len(p) > 1 && (p[1] == '/' || p[1] == '\\') {
			return false
		}
		if !strings.Contains(p, "%") {
			return true
		}
		dec, err := url.PathUnescape(p)
		if err != nil {
			return false
		}
		for i := 0; i < len(dec); i++ {
			if c := dec[i]; c < ' ' || c == 0x7f || c == '\\' {
				return false
			}
		}
		if dec == p {
			return true
		}
		p = dec
	}
	// Still percent-encoded after three rounds: refuse rather than guess.
	return false
}

// hostPort splits a Host header value into a lowercase hostname and a port
// ("" if none).
func hostPort(hostport string) (host, port string) {
	if h, p, err := net.SplitHostPort(hostport); err == nil {
		return strings.ToLower(h), p
	}
	return strings.ToLower(strings.TrimSuffix(hostport, ".")), ""
}

// portalOrigin returns the portal's origin as seen from a request to host
// r.Host on the circle: "https://<domain>", with the port of r.Host when it
// has one (for circles served on a non-default port, like the demo).
func portalOrigin(domain string, r *http.Request) string {
	_, port := hostPort(r.Host)
	if port == "" || port == "443" || !validPort(port) {
		return "https://" + domain
	}
	return "https://" + domain + ":" + port
}
