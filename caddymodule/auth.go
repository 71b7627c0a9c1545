package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/homecircle/circle/identity"
)

func init() {
	caddy.RegisterModule(Auth{})
}

// Auth is the `circle_auth` gate (module http.handlers.circle_auth). It
// lets a request through to the next handler only with a valid circle
// session cookie whose member satisfies the policy.
//
// Behaviour (contract, see DESIGN.md "Gate behaviour"):
//   - Every client-supplied header whose name starts with "Remote-" (any
//     case; also "Remote_", which CGI-style backends read as the same
//     variable) is deleted first, always.
//   - Valid session: the request goes on with Remote-User, Remote-Name,
//     Remote-Email and Remote-Groups (comma-separated) set, and the
//     placeholders {http.auth.user.id} (account id),
//     {http.auth.user.username}, {http.auth.user.name},
//     {http.auth.user.email} and {http.auth.user.groups}.
//   - No, invalid, expired or revoked session: a request whose Accept has
//     text/html gets 302 to https://<domain>/login?redirect=<original URL>
//     (the original URL is https://<request Host><request URI>; when the
//     request Host has a port other than 443, the portal URL carries the
//     same port, as in the demo); anything else gets 401 with a JSON
//     {"error": "..."} body. Never 500.
//   - Policy failure: 403 with an HTML page.
//   - The circle_session cookie itself is removed from the request before
//     it goes on (other cookies stay), so apps never hold a circle token.
type Auth struct {
	// AllowGroups admits members of any of these groups (case-insensitive).
	// Default: none. With neither AllowGroups nor AllowUsers, any signed-in
	// member of the circle passes.
	AllowGroups []string `json:"allow_groups,omitempty"`

	// AllowUsers admits these usernames (case-insensitive). Default: none.
	// With neither AllowGroups nor AllowUsers, any signed-in member of the
	// circle passes.
	AllowUsers []string `json:"allow_users,omitempty"`

	ident  *identity.Service
	domain string
	policy identity.Policy
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Auth) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.circle_auth",
		New: func() caddy.Module { return new(Auth) },
	}
}

// Provision gets the identity service and domain from the `circle` app.
func (g *Auth) Provision(ctx caddy.Context) error {
	g.logger = ctx.Logger()
	ident, domain, err := circleIdentity(ctx)
	if err != nil {
		return err
	}
	g.init(ident, domain)
	return nil
}

// init sets the unexported state; tests call it directly.
func (g *Auth) init(ident *identity.Service, domain string) {
	g.ident = ident
	g.domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	g.policy = identity.Policy{Users: g.AllowUsers, Groups: g.AllowGroups}
	if g.logger == nil {
		g.logger = zap.NewNop()
	}
}

// Validate checks the policy names.
func (g *Auth) Validate() error {
	for _, n := range g.AllowGroups {
		if n == "" || strings.ContainsAny(n, " \t,") {
			return fmt.Errorf("circle_auth: invalid group name %q", n)
		}
	}
	for _, n := range g.AllowUsers {
		if n == "" || strings.ContainsAny(n, " \t,") {
			return fmt.Errorf("circle_auth: invalid username %q", n)
		}
	}
	return nil
}

// circleIdentity loads the `circle` app and returns its identity service
// and domain.
func circleIdentity(ctx caddy.Context) (*identity.Service, string, error) {
	appIface, err := ctx.App("circle")
	if err != nil {
		return nil, "", fmt.Errorf("loading circle app (is the circle global option set?): %w", err)
	}
	app, ok := appIface.(*App)
	if !ok {
		return nil, "", fmt.Errorf("circle app is %T, not *caddymodule.App", appIface)
	}
	ident := app.Identity()
	if ident == nil {
		return nil, "", errors.New("circle app has no identity service (not provisioned)")
	}
	domain := app.Domain()
	if domain == "" {
		return nil, "", errors.New("circle app has no domain")
	}
	return ident, domain, nil
}

// stripRemoteHeaders deletes every request header whose name starts with
// "Remote-" or "Remote_" in any case. Deleting from a map while ranging
// over it is safe in Go.
func stripRemoteHeaders(h http.Header) {
	for k := range h {
		if len(k) >= 7 && (k[6] == '-' || k[6] == '_') && strings.EqualFold(k[:6], "remote") {
			delete(h, k)
		}
	}
}

// stripSessionCookie removes the circle_session cookie from the request's
// Cookie headers, keeping every other cookie as it was: the app behind the
// gate gets the identity headers, never a token that would open every other
// app of the circle if that app were compromised.
func stripSessionCookie(h http.Header) {
	vals := h["Cookie"]
	out := vals[:0]
	for _, v := range vals {
		if !strings.Contains(v, SessionCookie) {
			out = append(out, v)
			continue
		}
		var kept []string
		for part := range strings.SplitSeq(v, ";") {
			name, _, _ := strings.Cut(strings.TrimSpace(part), "=")
			if name != SessionCookie {
				kept = append(kept, strings.TrimSpace(part))
			}
		}
		if len(kept) > 0 {
			out = append(out, strings.Join(kept, "; "))
		}
	}
	if len(out) == 0 {
		delete(h, "Cookie")
		return
	}
	h["Cookie"] = out
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (g *Auth) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	stripRemoteHeaders(r.Header)

	token := sessionToken(r)
	if token == "" {
		return g.unauthenticated(w, r, "not signed in")
	}
	claims, err := g.ident.Verify(token)
	if err != nil {
		if c := g.logger.Check(zapcore.DebugLevel, "session refused"); c != nil {
			c.Write(zap.Error(err))
		}
		msg := "invalid session"
		switch {
		case errors.Is(err, identity.ErrExpired):
			msg = "session expired"
		case errors.Is(err, identity.ErrRevoked):
			msg = "session revoked"
		}
		return g.unauthenticated(w, r, msg)
	}
	if !g.policy.Allows(claims) {
		if c := g.logger.Check(zapcore.InfoLevel, "access denied by policy"); c != nil {
			c.Write(zap.String("username", claims.Username), zap.String("host", r.Host))
		}
		writeForbidden(w, g.domain, portalOrigin(g.domain, r), claims.Username)
		return nil
	}

	stripSessionCookie(r.Header)
	groups := strings.Join(claims.Groups, ",")
	// One backing array for the four header values.
	vals := [...]string{claims.Username, claims.Name, claims.Email, groups}
	hv := vals[:]
	r.Header["Remote-User"] = hv[0:1:1]
	r.Header["Remote-Name"] = hv[1:2:2]
	r.Header["Remote-Email"] = hv[2:3:3]
	r.Header["Remote-Groups"] = hv[3:4:4]

	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("http.auth.user.id", claims.Subject)
		repl.Set("http.auth.user.username", claims.Username)
		repl.Set("http.auth.user.name", claims.Name)
		repl.Set("http.auth.user.email", claims.Email)
		repl.Set("http.auth.user.groups", groups)
	}
	return next.ServeHTTP(w, r)
}

// unauthenticated answers a request without a usable session: 302 to the
// portal's login for browsers, 401 JSON otherwise.
func (g *Auth) unauthenticated(w http.ResponseWriter, r *http.Request, msg string) error {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Add("Vary", "Accept, Cookie")
	if wantsHTML(r) {
		orig := "https://" + r.Host + r.URL.RequestURI()
		h.Set("Location", portalOrigin(g.domain, r)+"/login?redirect="+url.QueryEscape(orig))
		w.WriteHeader(http.StatusFound)
		return nil
	}
	portalJSONError(w, http.StatusUnauthorized, msg)
	return nil
}

// wantsHTML reports whether the request's Accept header mentions text/html.
func wantsHTML(r *http.Request) bool {
	for _, v := range r.Header["Accept"] {
		if strings.Contains(strings.ToLower(v), "text/html") {
			return true
		}
	}
	return false
}

// UnmarshalCaddyfile sets up the gate from Caddyfile tokens. Syntax:
//
//	circle_auth {
//		allow group <name>...
//		allow user  <name>...
//	}
//
// The block is optional; without an allow rule any signed-in member
// passes. `allow` may repeat; rules add up (a member passes if any rule
// admits them). Unknown subdirectives are errors.
func (g *Auth) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "allow":
			if !d.NextArg() {
				return d.ArgErr()
			}
			kind := d.Val()
			names := d.RemainingArgs()
			if len(names) == 0 {
				return d.Errf("allow %s: at least one name is required", kind)
			}
			switch kind {
			case "group", "groups":
				g.AllowGroups = append(g.AllowGroups, names...)
			case "user", "users":
				g.AllowUsers = append(g.AllowUsers, names...)
			default:
				return d.Errf("allow: expected 'group' or 'user', got %q", kind)
			}
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Auth)(nil)
	_ caddy.Validator             = (*Auth)(nil)
	_ caddyhttp.MiddlewareHandler = (*Auth)(nil)
	_ caddyfile.Unmarshaler       = (*Auth)(nil)
)
