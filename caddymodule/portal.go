package caddymodule

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"html/template"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
)

func init() {
	caddy.RegisterModule(Portal{})
}

// maxBodyBytes limits every request body the portal reads.
const maxBodyBytes = 64 << 10

// Portal is the circle's portal (module http.handlers.circle_portal), served
// at the apex of the circle domain. It implements the Portal HTTP API
// contract of DESIGN.md:
//
//	GET  /login                 sign-in form (?redirect=)
//	POST /login                 username, password, redirect, csrf -> 303 + session cookie
//	GET  /logout                a confirmation page with a sign-out button
//	POST /logout                revoke this session everywhere, clear the cookie
//	GET  /register?invite=T     invite-only registration form
//	POST /register?invite=T     username, password, [confirm], [name], [email], csrf
//	GET  /account               profile, password, sessions, log out everywhere (or the
//	                            forced rename form after a username collision)
//	POST /account/profile       name, email
//	POST /account/password      current, new
//	POST /account/rename        username
//	POST /account/revoke        sid
//	POST /account/logout-all    revoke every session of the account
//	GET  /admin                 for members of the group "admins": accounts, invites
//	POST /admin/invite          groups, ttl (1d, 3d, 7d); the page shows the invite URL once
//	POST /admin/groups          id, groups (comma-separated)
//	POST /admin/disable         id (also revokes the account's sessions)
//	POST /admin/enable          id
//	POST /admin/logout-all      id: revoke every session of that account
//	POST /api/login             JSON {"username","password"}
//	GET  /api/me                JSON {"username","name","email","groups"} or 401
//	POST /api/logout            as POST /logout, JSON
//	GET  /.well-known/jwks.json the circle's public session keys
//	GET  /                      302 to /account
//
// The /admin pages answer 403 to members outside the group "admins" and
// send visitors who are not signed in to the login page; an admin cannot
// disable themself or leave the admins group there.
//
// Every other path under /account/, /admin/ and /api/ is answered 404 by the
// portal; all remaining paths (e.g. /favicon.ico, /robots.txt) go to the
// next handler, so a site can serve more content next to the portal.
//
// Form POSTs need the double-submit CSRF token (the host-only circle_csrf
// cookie, repeated in the "csrf" field) and, when the browser sends them,
// an Origin equal to the portal's origin and a Sec-Fetch-Site of
// same-origin or none. The Origin check is what defeats cookie tossing: an
// app on a circle subdomain could plant a circle_csrf cookie for the
// domain, but its requests carry its own Origin. JSON POSTs need
// Content-Type application/json and, if present, an Origin that is https
// on the circle domain or a subdomain (those origins also get CORS
// responses with credentials). Request bodies are limited to 64 KiB.
type Portal struct {
	// Title is the circle's name shown on the portal's pages.
	// Default: the circle domain.
	Title string `json:"title,omitempty"`

	ident  *identity.Service
	domain string
	logger *zap.Logger
	now    func() time.Time
}

// CaddyModule returns the Caddy module information.
func (Portal) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.circle_portal",
		New: func() caddy.Module { return new(Portal) },
	}
}

// Provision gets the identity service and domain from the `circle` app.
func (p *Portal) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	ident, domain, err := circleIdentity(ctx)
	if err != nil {
		return err
	}
	p.init(ident, domain)
	return nil
}

// init sets the unexported state and defaults; tests call it directly.
func (p *Portal) init(ident *identity.Service, domain string) {
	p.ident = ident
	p.domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if p.Title == "" {
		p.Title = p.domain
	}
	if p.logger == nil {
		p.logger = zap.NewNop()
	}
	if p.now == nil {
		p.now = time.Now
	}
}

// UnmarshalCaddyfile sets up the portal from Caddyfile tokens. Syntax:
//
//	circle_portal {
//		title <text>
//	}
//
// The block is optional. Unknown subdirectives are errors.
func (p *Portal) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "title":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if p.Title != "" {
				return d.Err("title specified more than once")
			}
			p.Title = strings.Join(args, " ")
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

// ---- templates and response helpers

//go:embed portal_templates/*.html portal_templates/style.css
var portalFS embed.FS

var (
	pageTemplates = map[string]*template.Template{}
	portalCSS     template.CSS
	portalCSP     string
)

func init() {
	css, err := portalFS.ReadFile("portal_templates/style.css")
	if err != nil {
		panic(err)
	}
	cssText := strings.TrimSpace(string(css))
	portalCSS = template.CSS(cssText)
	sum := sha256.Sum256([]byte(cssText))
	portalCSP = "default-src 'self'; script-src 'none'; style-src 'sha256-" +
		base64.StdEncoding.EncodeToString(sum[:]) +
		"'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
	for _, name := range []string{"login", "register", "account", "message"} {
		pageTemplates[name] = template.Must(template.ParseFS(portalFS,
			"portal_templates/layout.html", "portal_templates/"+name+".html"))
	}
}

// pageData is what every page template gets.
type pageData struct {
	Title, Heading string
	CSS            template.CSS
	Wide           bool
	Error, Notice  string
	CSRF           string

	// login
	Redirect string
	// register
	InviteOK     bool
	Invite       string
	InviteGroups []string
	Username     string
	Name, Email  string
	// account
	Account  *identity.Account
	Sessions []sessionView
	// message
	Message, Link, LinkText string
	LogoutForm              bool
	// admin
	Admin *adminView
}

// sessionView is a session as the account page lists it.
type sessionView struct {
	ID, Device, IP, Created string
	Current                 bool
}

// setSecurityHeaders sets the headers of every portal-made response.
func setSecurityHeaders(h http.Header) {
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", portalCSP)
	// same-origin, not no-referrer: under no-referrer browsers send
	// "Origin: null" with the portal's own form POSTs, which the Origin check
	// must refuse; same-origin still gives other sites no referrer.
	h.Set("Referrer-Policy", "same-origin")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
}

// renderPage writes page name with status. Templates are rendered to a
// buffer first so a failure never leaves a half-written page.
func renderPage(w http.ResponseWriter, status int, name string, d *pageData) {
	d.CSS = portalCSS
	var buf bytes.Buffer
	if err := pageTemplates[name].ExecuteTemplate(&buf, "layout", d); err != nil {
		// Only a bug in the templates can get here.
		http.Error(w, "internal error rendering page", http.StatusInternalServerError)
		return
	}
	setSecurityHeaders(w.Header())
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// writeForbidden writes the gate's 403 page.
func writeForbidden(w http.ResponseWriter, title, portal, username string) {
	msg := "This app is not shared with your account."
	if username != "" {
		msg = "You are signed in as " + username + ", but this app is not shared with your account. Ask the member who runs it to add you."
	}
	renderPage(w, http.StatusForbidden, "message", &pageData{
		Title: title, Heading: "Not for this account", Message: msg,
		Link: portal + "/account", LinkText: "Go to your account",
	})
}

// portalJSON writes v as JSON with status.
func portalJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(`{"error":"internal error"}`)
		status = http.StatusInternalServerError
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// portalJSONError writes {"error": msg} with status.
func portalJSONError(w http.ResponseWriter, status int, msg string) {
	portalJSON(w, status, struct {
		Error string `json:"error"`
	}{msg})
}

// setRetryAfter sets Retry-After in whole seconds (rounded up, at least 1).
func setRetryAfter(h http.Header, d time.Duration) {
	s := int64(math.Ceil(d.Seconds()))
	if s < 1 {
		s = 1
	}
	h.Set("Retry-After", strconv.FormatInt(s, 10))
}

// ---- routing

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (p *Portal) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	path := r.URL.Path
	get := r.Method == http.MethodGet || r.Method == http.MethodHead
	post := r.Method == http.MethodPost
	switch path {
	case "/":
		if !get {
			return p.methodNotAllowed(w, "GET, HEAD")
		}
		setSecurityHeaders(w.Header())
		http.Redirect(w, r, "/account", http.StatusFound)
	case "/login":
		switch {
		case get:
			p.loginPage(w, r)
		case post:
			p.loginForm(w, r)
		default:
			return p.methodNotAllowed(w, "GET, HEAD, POST")
		}
	case "/logout":
		switch {
		case get:
			renderPage(w, http.StatusOK, "message", &pageData{
				Title: p.Title, Heading: "Sign out", CSRF: p.ensureCSRF(w, r),
				Message: "Sign out of every app of the circle on this device?", LogoutForm: true,
				Link: "/account", LinkText: "Back to your account",
			})
		case post:
			p.logoutForm(w, r)
		default:
			return p.methodNotAllowed(w, "GET, HEAD, POST")
		}
	case "/register":
		switch {
		case get:
			p.registerPage(w, r)
		case post:
			p.registerForm(w, r)
		default:
			return p.methodNotAllowed(w, "GET, HEAD, POST")
		}
	case "/account":
		if !get {
			return p.methodNotAllowed(w, "GET, HEAD")
		}
		p.accountPage(w, r)
	case "/account/profile", "/account/password", "/account/rename", "/account/revoke", "/account/logout-all":
		if !post {
			return p.methodNotAllowed(w, "POST")
		}
		p.accountAction(w, r, strings.TrimPrefix(path, "/account/"))
	case "/api/login", "/api/me", "/api/logout":
		p.api(w, r, path)
	case "/.well-known/jwks.json":
		if !get {
			return p.methodNotAllowed(w, "GET, HEAD")
		}
		h := w.Header()
		h.Set("Content-Type", "application/jwk-set+json")
		h.Set("Cache-Control", "public, max-age=300")
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("X-Content-Type-Options", "nosniff")
		_, _ = w.Write(p.ident.JWKS())
	default:
		switch {
		case strings.HasPrefix(path, "/api/"):
			portalJSONError(w, http.StatusNotFound, "no such API endpoint")
		case strings.HasPrefix(path, "/account/"):
			renderPage(w, http.StatusNotFound, "message", &pageData{
				Title: p.Title, Heading: "Not found", Message: "There is no such page.",
				Link: "/account", LinkText: "Go to your account",
			})
		case path == "/admin" || strings.HasPrefix(path, "/admin/"):
			return p.serveAdmin(w, r)
		default:
			return next.ServeHTTP(w, r)
		}
	}
	return nil
}

func (p *Portal) methodNotAllowed(w http.ResponseWriter, allow string) error {
	setSecurityHeaders(w.Header())
	w.Header().Set("Allow", allow)
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return nil
}

// ---- shared request helpers

// clientIP is the client address Caddy determined (honouring
// trusted_proxies), else the connection's remote address.
func clientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return host
	}
	return r.RemoteAddr
}

// currentSession returns the verified claims of the request's session.
func (p *Portal) currentSession(r *http.Request) (identity.Claims, bool) {
	token := sessionToken(r)
	if token == "" {
		return identity.Claims{}, false
	}
	c, err := p.ident.Verify(token)
	if err != nil {
		return identity.Claims{}, false
	}
	return c, true
}

// defaultRedirect is where a sign-in goes without a (valid) redirect.
func (p *Portal) defaultRedirect(r *http.Request) string {
	return portalOrigin(p.domain, r) + "/account"
}

// redirectTarget validates a redirect parameter, falling back to the
// default.
func (p *Portal) redirectTarget(r *http.Request, raw string) string {
	if t, ok := safeRedirect(raw, p.domain); ok {
		return t
	}
	return p.defaultRedirect(r)
}

// newSession issues a session for a and sets its cookie.
func (p *Portal) newSession(ctx context.Context, w http.ResponseWriter, r *http.Request, a identity.Account) error {
	token, sess, err := p.ident.IssueSession(ctx, a, r.UserAgent(), clientIP(r))
	if err != nil {
		return err
	}
	http.SetCookie(w, sessionCookie(p.domain, token, sess.Expires, p.now()))
	return nil
}

// ---- CSRF

// csrfLen is the length of a CSRF token: base64url of 32 random bytes.
var csrfLen = base64.RawURLEncoding.EncodedLen(32)

// csrfCookieValue returns the browser's CSRF secret, or "".
func csrfCookieValue(r *http.Request) string {
	c, err := r.Cookie(CSRFCookie)
	if err != nil || len(c.Value) != csrfLen {
		return ""
	}
	if _, err := base64.RawURLEncoding.DecodeString(c.Value); err != nil {
		return ""
	}
	return c.Value
}

// ensureCSRF returns the browser's CSRF token, creating and setting the
// cookie if it has none.
func (p *Portal) ensureCSRF(w http.ResponseWriter, r *http.Request) string {
	if v := csrfCookieValue(r); v != "" {
		return v
	}
	v := base64.RawURLEncoding.EncodeToString(randomBytes(32))
	http.SetCookie(w, &http.Cookie{
		Name: CSRFCookie, Value: v, Path: "/",
		Secure: true, HttpOnly: true, SameSite: http.SameSiteLaxMode,
	})
	// Later reads in this request see it.
	r.AddCookie(&http.Cookie{Name: CSRFCookie, Value: v})
	return v
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand: " + err.Error())
	}
	return b
}

// sameOrigin reports whether a form POST comes from the portal itself:
// Origin (when sent) must be the portal's origin and Sec-Fetch-Site (when
// sent) same-origin or none.
func (p *Portal) sameOrigin(r *http.Request) bool {
	if o := r.Header.Get("Origin"); o != "" {
		if !strings.EqualFold(o, "https://"+r.Host) && !strings.EqualFold(o, portalOrigin(p.domain, r)) {
			return false
		}
	}
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
		return true
	}
	return false
}

// formError is why a form POST was refused before its handler ran.
type formError struct {
	status int
	msg    string
}

// readForm checks and parses a form POST: content type, size, origin and
// CSRF token.
func (p *Portal) readForm(w http.ResponseWriter, r *http.Request) *formError {
	ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || ct != "application/x-www-form-urlencoded" {
		return &formError{http.StatusUnsupportedMediaType, "The form was sent in an unexpected format."}
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	if err := r.ParseForm(); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &formError{http.StatusRequestEntityTooLarge, "The form is too large."}
		}
		return &formError{http.StatusBadRequest, "The form could not be read."}
	}
	if !p.sameOrigin(r) {
		return &formError{http.StatusForbidden, "This form was sent from another site and was refused."}
	}
	cookie := csrfCookieValue(r)
	field := r.PostForm.Get("csrf")
	if cookie == "" || len(field) != len(cookie) || subtle.ConstantTimeCompare([]byte(field), []byte(cookie)) != 1 {
		return &formError{http.StatusForbidden, "This form has expired. Please try again."}
	}
	return nil
}

// ---- login and logout

func (p *Portal) loginPage(w http.ResponseWriter, r *http.Request) {
	d := &pageData{Title: p.Title, Heading: "Sign in", CSRF: p.ensureCSRF(w, r)}
	if t, ok := safeRedirect(r.URL.Query().Get("redirect"), p.domain); ok {
		d.Redirect = t
	}
	switch r.URL.Query().Get("done") {
	case "signed_out":
		d.Notice = "You are signed out."
	case "registered":
		d.Notice = "Your account is ready. Please sign in."
	}
	if c, ok := p.currentSession(r); ok {
		d.Notice = "You are already signed in as " + c.Username + "."
	}
	renderPage(w, http.StatusOK, "login", d)
}

// badCredentials is the single message for a wrong password, an unknown
// user or a disabled account.
const badCredentials = "Wrong username or password."

func (p *Portal) loginForm(w http.ResponseWriter, r *http.Request) {
	ferr := p.readForm(w, r)
	d := &pageData{Title: p.Title, Heading: "Sign in", CSRF: p.ensureCSRF(w, r)}
	if t, ok := safeRedirect(r.PostForm.Get("redirect"), p.domain); ok {
		d.Redirect = t
	}
	if ferr != nil {
		d.Error = ferr.msg
		renderPage(w, ferr.status, "login", d)
		return
	}
	username, password := r.PostForm.Get("username"), r.PostForm.Get("password")
	if len(username) <= 64 {
		d.Username = username // typed back in for the next try (the same for known and unknown names)
	}
	if username == "" || password == "" {
		d.Error = "Please enter your username and password."
		renderPage(w, http.StatusBadRequest, "login", d)
		return
	}
	if _, status, msg := p.login(r, username, password, w); status != 0 {
		d.Error = msg
		renderPage(w, status, "login", d)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Location", p.redirectTarget(r, r.PostForm.Get("redirect")))
	w.WriteHeader(http.StatusSeeOther)
}

// login checks credentials and starts a session (setting the cookie). On
// failure it returns an HTTP status and a message for the user; 429 also
// sets Retry-After.
func (p *Portal) login(r *http.Request, username, password string, w http.ResponseWriter) (identity.Account, int, string) {
	ip := clientIP(r)
	acct, err := p.ident.Login(r.Context(), username, password, ip)
	if err == nil {
		err = p.newSession(r.Context(), w, r, acct)
	}
	var te *identity.ThrottledError
	switch {
	case err == nil:
		p.logger.Info("signed in", zap.String("username", acct.Username), zap.String("remote_ip", ip))
		return acct, 0, ""
	case errors.As(err, &te):
		p.logger.Info("sign-in throttled", zap.String("remote_ip", ip), zap.Duration("retry_after", te.RetryAfter))
		setRetryAfter(w.Header(), te.RetryAfter)
		return acct, http.StatusTooManyRequests, "Too many failed attempts. Please wait " + humanDuration(te.RetryAfter) + " and try again."
	case errors.Is(err, identity.ErrThrottled):
		setRetryAfter(w.Header(), time.Minute)
		return acct, http.StatusTooManyRequests, "Too many failed attempts. Please wait a minute and try again."
	case errors.Is(err, identity.ErrBadCredentials), errors.Is(err, identity.ErrDisabled),
		errors.Is(err, identity.ErrNotFound):
		p.logger.Info("sign-in failed", zap.String("remote_ip", ip))
		return acct, http.StatusUnauthorized, badCredentials
	default:
		p.logger.Error("sign-in error", zap.String("remote_ip", ip), zap.Error(err))
		return acct, http.StatusServiceUnavailable, "The circle could not complete your sign-in just now. Please try again."
	}
}

// humanDuration renders a short wait for people.
func humanDuration(d time.Duration) string {
	s := int(math.Ceil(d.Seconds()))
	switch {
	case s <= 1:
		return "a second"
	case s < 90:
		return strconv.Itoa(s) + " seconds"
	default:
		return strconv.Itoa((s+59)/60) + " minutes"
	}
}

// endSession revokes the request's session (if any) and clears the cookie.
func (p *Portal) endSession(w http.ResponseWriter, r *http.Request) {
	if c, ok := p.currentSession(r); ok {
		if err := p.ident.RevokeSession(r.Context(), c.SessionID); err != nil {
			// identity applies the revocation locally first and keeps
			// replicating it; the user is signed out here either way.
			p.logger.Warn("revoking session", zap.String("username", c.Username), zap.Error(err))
		}
	}
	http.SetCookie(w, clearSessionCookie(p.domain))
}

func (p *Portal) logoutForm(w http.ResponseWriter, r *http.Request) {
	if ferr := p.readForm(w, r); ferr != nil {
		renderPage(w, ferr.status, "message", &pageData{
			Title: p.Title, Heading: "Sign out", Error: ferr.msg, CSRF: p.ensureCSRF(w, r),
			Message: "Sign out of every app of the circle on this device?", LogoutForm: true,
		})
		return
	}
	p.endSession(w, r)
	setSecurityHeaders(w.Header())
	w.Header().Set("Location", "/login?done=signed_out")
	w.WriteHeader(http.StatusSeeOther)
}

// ---- registration

func (p *Portal) registerPage(w http.ResponseWriter, r *http.Request) {
	token := r.URL.Query().Get("invite")
	d := &pageData{Title: p.Title, Heading: "Join the circle", CSRF: p.ensureCSRF(w, r), Invite: token}
	status := http.StatusOK
	if inv, err := p.inviteFor(token); err == nil {
		d.InviteOK, d.InviteGroups = true, inv.Groups
	} else {
		d.Heading = "Invite not valid"
		status = http.StatusBadRequest
	}
	renderPage(w, status, "register", d)
}

// inviteFor checks an invite token (bounded in length before lookup).
func (p *Portal) inviteFor(token string) (identity.Invite, error) {
	if token == "" || len(token) > 256 {
		return identity.Invite{}, identity.ErrInvalidInvite
	}
	return p.ident.CheckInvite(token)
}

func (p *Portal) registerForm(w http.ResponseWriter, r *http.Request) {
	ferr := p.readForm(w, r)
	token := r.PostForm.Get("invite")
	if token == "" {
		token = r.URL.Query().Get("invite")
	}
	d := &pageData{
		Title: p.Title, Heading: "Join the circle", CSRF: p.ensureCSRF(w, r), Invite: token,
		Username: r.PostForm.Get("username"), Name: r.PostForm.Get("name"), Email: r.PostForm.Get("email"),
	}
	inv, err := p.inviteFor(token)
	if err != nil {
		d.Heading = "Invite not valid"
		renderPage(w, http.StatusBadRequest, "register", d)
		return
	}
	d.InviteOK, d.InviteGroups = true, inv.Groups
	fail := func(status int, msg string) {
		d.Error = msg
		renderPage(w, status, "register", d)
	}
	if ferr != nil {
		fail(ferr.status, ferr.msg)
		return
	}
	password := r.PostForm.Get("password")
	switch {
	case d.Username == "" || password == "":
		fail(http.StatusBadRequest, "Please choose a username and a password.")
		return
	case r.PostForm.Has("confirm") && r.PostForm.Get("confirm") != password:
		fail(http.StatusBadRequest, "The two passwords do not match.")
		return
	}
	acct, err := p.ident.Register(r.Context(), token, identity.NewAccount{
		Username: d.Username, Password: password, Name: d.Name, Email: d.Email,
	})
	switch {
	case err == nil:
	case errors.Is(err, identity.ErrInvalidInvite):
		d.InviteOK = false
		d.Heading = "Invite not valid"
		renderPage(w, http.StatusBadRequest, "register", d)
		return
	case errors.Is(err, identity.ErrUsernameTaken):
		fail(http.StatusConflict, "That username is taken. Please choose another one.")
		return
	case errors.Is(err, identity.ErrInvalidUsername):
		fail(http.StatusBadRequest, "Usernames are 2 to 32 characters: lowercase letters, digits, dot, dash or underscore, starting with a letter or digit.")
		return
	case errors.Is(err, identity.ErrWeakPassword):
		fail(http.StatusBadRequest, "Passwords must be at least 8 characters long.")
		return
	case errors.Is(err, identity.ErrInvalidInput):
		fail(http.StatusBadRequest, "Please check your name and email address.")
		return
	default:
		p.logger.Error("registration error", zap.Error(err))
		fail(http.StatusServiceUnavailable, "The circle could not create your account just now. Please try again.")
		return
	}
	p.logger.Info("registered", zap.String("username", acct.Username), zap.String("remote_ip", clientIP(r)))
	setSecurityHeaders(w.Header())
	if err := p.newSession(r.Context(), w, r, acct); err != nil {
		p.logger.Warn("session after registration", zap.Error(err))
		w.Header().Set("Location", "/login?done=registered")
	} else {
		w.Header().Set("Location", "/account?done=welcome")
	}
	w.WriteHeader(http.StatusSeeOther)
}

// ---- account

// accountNotices are the messages of /account?done=...
var accountNotices = map[string]string{
	"welcome":  "Welcome to the circle! Your account is ready.",
	"profile":  "Your profile was saved.",
	"password": "Your password was changed.",
	"rename":   "Your new username is set.",
	"revoked":  "That session was signed out.",
}

// signedInAccount returns the session claims and current account of the
// request, or redirects to the login page and returns false.
func (p *Portal) signedInAccount(w http.ResponseWriter, r *http.Request) (identity.Claims, identity.Account, bool) {
	return p.signedInAccountAt(w, r, "/account")
}

// signedInAccountAt is signedInAccount for the portal page at path: the
// login page sends the member back there.
func (p *Portal) signedInAccountAt(w http.ResponseWriter, r *http.Request, path string) (identity.Claims, identity.Account, bool) {
	c, ok := p.currentSession(r)
	if ok {
		a, err := p.ident.Account(c.Subject)
		if err == nil {
			return c, a, true
		}
	}
	setSecurityHeaders(w.Header())
	target := portalOrigin(p.domain, r) + path
	w.Header().Set("Location", "/login?redirect="+url.QueryEscape(target))
	if r.Method == http.MethodPost {
		w.WriteHeader(http.StatusSeeOther)
	} else {
		w.WriteHeader(http.StatusFound)
	}
	return c, identity.Account{}, false
}

func (p *Portal) accountPage(w http.ResponseWriter, r *http.Request) {
	c, a, ok := p.signedInAccount(w, r)
	if !ok {
		return
	}
	p.renderAccount(w, r, c, a, http.StatusOK, "", accountNotices[r.URL.Query().Get("done")])
}

func (p *Portal) renderAccount(w http.ResponseWriter, r *http.Request, c identity.Claims, a identity.Account, status int, errMsg, notice string) {
	d := &pageData{
		Title: p.Title, Heading: "Your account", CSRF: p.ensureCSRF(w, r), Wide: true,
		Account: &a, Error: errMsg, Notice: notice,
	}
	if a.MustRename {
		d.Heading = "Choose a new username"
		d.Wide = false
	} else {
		sessions, err := p.ident.Sessions(a.ID)
		if err != nil {
			p.logger.Warn("listing sessions", zap.Error(err))
			if d.Error == "" {
				d.Error = "Your sessions could not be listed just now."
			}
		}
		for _, s := range sessions {
			d.Sessions = append(d.Sessions, sessionView{
				ID: s.ID, Device: describeUserAgent(s.UserAgent), IP: s.IP,
				Created: s.Created.UTC().Format("2 Jan 2006 15:04 UTC"), Current: s.ID == c.SessionID,
			})
		}
	}
	renderPage(w, status, "account", d)
}

// describeUserAgent turns a User-Agent into a short device description.
func describeUserAgent(ua string) string {
	if ua == "" {
		return "Unknown device"
	}
	browser := ""
	for _, b := range []struct{ token, name string }{
		{"Firefox/", "Firefox"}, {"Edg/", "Edge"}, {"OPR/", "Opera"}, {"Chrome/", "Chrome"},
		{"Safari/", "Safari"}, {"curl/", "curl"},
	} {
		if strings.Contains(ua, b.token) {
			browser = b.name
			break
		}
	}
	system := ""
	for _, s := range []struct{ token, name string }{
		{"Android", "Android"}, {"iPhone", "iPhone"}, {"iPad", "iPad"}, {"Windows", "Windows"},
		{"Mac OS X", "macOS"}, {"CrOS", "ChromeOS"}, {"Linux", "Linux"},
	} {
		if strings.Contains(ua, s.token) {
			system = s.name
			break
		}
	}
	switch {
	case browser != "" && system != "":
		return browser + " on " + system
	case browser != "":
		return browser
	case system != "":
		return system
	}
	if len(ua) > 60 {
		ua = ua[:60] + "…"
	}
	return strings.ToValidUTF8(ua, "")
}

func (p *Portal) accountAction(w http.ResponseWriter, r *http.Request, action string) {
	ferr := p.readForm(w, r)
	c, a, ok := p.signedInAccount(w, r)
	if !ok {
		return
	}
	if ferr != nil {
		p.renderAccount(w, r, c, a, ferr.status, ferr.msg, "")
		return
	}
	ctx := r.Context()
	done := func(code string) {
		setSecurityHeaders(w.Header())
		w.Header().Set("Location", "/account?done="+code)
		w.WriteHeader(http.StatusSeeOther)
	}
	fail := func(status int, msg string) { p.renderAccount(w, r, c, a, status, msg, "") }
	unavailable := func(err error) {
		p.logger.Error("account action", zap.String("action", action), zap.String("username", a.Username), zap.Error(err))
		fail(http.StatusServiceUnavailable, "That could not be saved just now. Please try again.")
	}
	if a.MustRename && action != "rename" && action != "logout-all" {
		fail(http.StatusConflict, "Please choose a new username first.")
		return
	}

	switch action {
	case "profile":
		_, err := p.ident.UpdateProfile(ctx, a.ID, r.PostForm.Get("name"), r.PostForm.Get("email"))
		switch {
		case err == nil:
			done("profile")
		case errors.Is(err, identity.ErrInvalidInput):
			fail(http.StatusBadRequest, "Please check your name and email address.")
		default:
			unavailable(err)
		}
	case "password":
		err := p.ident.ChangePassword(ctx, a.ID, r.PostForm.Get("current"), r.PostForm.Get("new"))
		switch {
		case err == nil:
			p.logger.Info("password changed", zap.String("username", a.Username))
			done("password")
		case errors.Is(err, identity.ErrWeakPassword):
			fail(http.StatusBadRequest, "The new password must be at least 8 characters long.")
		case errors.Is(err, identity.ErrBadCredentials):
			fail(http.StatusBadRequest, "Your current password is not right.")
		default:
			unavailable(err)
		}
	case "rename":
		_, err := p.ident.Rename(ctx, a.ID, r.PostForm.Get("username"))
		switch {
		case err == nil:
			done("rename")
		case errors.Is(err, identity.ErrUsernameTaken):
			fail(http.StatusConflict, "That username is taken. Please choose another one.")
		case errors.Is(err, identity.ErrInvalidUsername):
			fail(http.StatusBadRequest, "Usernames are 2 to 32 characters: lowercase letters, digits, dot, dash or underscore, starting with a letter or digit.")
		default:
			unavailable(err)
		}
	case "revoke":
		sid := r.PostForm.Get("sid")
		if sid == c.SessionID {
			p.logoutRedirect(w, r)
			return
		}
		sessions, err := p.ident.Sessions(a.ID)
		if err != nil {
			unavailable(err)
			return
		}
		found := false
		for _, s := range sessions {
			if s.ID == sid {
				found = true
				break
			}
		}
		if !found {
			fail(http.StatusBadRequest, "That session is not one of yours, or it has ended already.")
			return
		}
		if err := p.ident.RevokeSession(ctx, sid); err != nil {
			unavailable(err)
			return
		}
		done("revoked")
	case "logout-all":
		if err := p.ident.RevokeAll(ctx, a.ID); err != nil {
			unavailable(err)
			return
		}
		p.logger.Info("logged out everywhere", zap.String("username", a.Username))
		http.SetCookie(w, clearSessionCookie(p.domain))
		setSecurityHeaders(w.Header())
		w.Header().Set("Location", "/login?done=signed_out")
		w.WriteHeader(http.StatusSeeOther)
	}
}

// logoutRedirect ends the session and sends the browser to the login page.
func (p *Portal) logoutRedirect(w http.ResponseWriter, r *http.Request) {
	p.endSession(w, r)
	setSecurityHeaders(w.Header())
	w.Header().Set("Location", "/login?done=signed_out")
	w.WriteHeader(http.StatusSeeOther)
}

// ---- JSON API

// apiUser is the JSON shape of a member in API responses.
type apiUser struct {
	Username string   `json:"username"`
	Name     string   `json:"name"`
	Email    string   `json:"email"`
	Groups   []string `json:"groups"`
}

func newAPIUser(username, name, email string, groups []string) apiUser {
	if groups == nil {
		groups = []string{}
	}
	return apiUser{Username: username, Name: name, Email: email, Groups: groups}
}

// allowedOrigin reports whether origin is https on the circle domain or a
// subdomain (any port).
func (p *Portal) allowedOrigin(origin string) bool {
	const scheme = "https://"
	if len(origin) <= len(scheme) || !strings.EqualFold(origin[:len(scheme)], scheme) {
		return false
	}
	hp := origin[len(scheme):]
	host, port := hp, ""
	if i := strings.LastIndexByte(hp, ':'); i >= 0 {
		host, port = hp[:i], hp[i+1:]
		if port == "" {
			return false
		}
	}
	return validPort(port) && validHostname(host) && inDomain(strings.ToLower(host), p.domain)
}

func (p *Portal) api(w http.ResponseWriter, r *http.Request, path string) {
	h := w.Header()
	h.Set("X-Frame-Options", "DENY")
	h.Add("Vary", "Origin")
	origin := r.Header.Get("Origin")
	originOK := origin == "" || p.allowedOrigin(origin)
	if origin != "" && originOK {
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Allow-Credentials", "true")
	}
	wantMethod := http.MethodPost
	if path == "/api/me" {
		wantMethod = http.MethodGet
	}
	if r.Method == http.MethodOptions {
		if origin == "" || !originOK {
			portalJSONError(w, http.StatusForbidden, "origin not allowed")
			return
		}
		h.Set("Access-Control-Allow-Methods", wantMethod)
		h.Set("Access-Control-Allow-Headers", "Content-Type")
		h.Set("Access-Control-Max-Age", "600")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if r.Method != wantMethod && !(wantMethod == http.MethodGet && r.Method == http.MethodHead) {
		h.Set("Allow", wantMethod+", OPTIONS")
		portalJSONError(w, http.StatusMethodNotAllowed, "method not allowed")
		return
	}

	if path == "/api/me" {
		c, ok := p.currentSession(r)
		if !ok {
			portalJSONError(w, http.StatusUnauthorized, "not signed in")
			return
		}
		portalJSON(w, http.StatusOK, newAPIUser(c.Username, c.Name, c.Email, c.Groups))
		return
	}

	// JSON POSTs.
	if !originOK || r.Header.Get("Sec-Fetch-Site") == "cross-site" {
		portalJSONError(w, http.StatusForbidden, "origin not allowed")
		return
	}
	ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || ct != "application/json" {
		portalJSONError(w, http.StatusUnsupportedMediaType, "Content-Type must be application/json")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			portalJSONError(w, http.StatusRequestEntityTooLarge, "request body too large")
		} else {
			portalJSONError(w, http.StatusBadRequest, "could not read the request body")
		}
		return
	}

	switch path {
	case "/api/logout":
		p.endSession(w, r)
		portalJSON(w, http.StatusOK, struct {
			OK bool `json:"ok"`
		}{true})
	case "/api/login":
		var req struct {
			Username *string `json:"username"`
			Password *string `json:"password"`
		}
		dec := json.NewDecoder(bytes.NewReader(body))
		if err := dec.Decode(&req); err != nil || dec.More() {
			portalJSONError(w, http.StatusBadRequest, "body must be a JSON object {\"username\": ..., \"password\": ...}")
			return
		}
		if req.Username == nil || req.Password == nil || *req.Username == "" || *req.Password == "" {
			portalJSONError(w, http.StatusBadRequest, "username and password are required")
			return
		}
		acct, status, _ := p.login(r, *req.Username, *req.Password, w)
		switch status {
		case 0:
			portalJSON(w, http.StatusOK, newAPIUser(acct.Username, acct.Name, acct.Email, acct.Groups))
		case http.StatusUnauthorized:
			portalJSONError(w, status, "wrong username or password")
		case http.StatusTooManyRequests:
			portalJSONError(w, status, "too many failed attempts; retry after the time in Retry-After")
		default:
			portalJSONError(w, status, "the circle could not complete the sign-in; try again")
		}
	}
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Portal)(nil)
	_ caddyhttp.MiddlewareHandler = (*Portal)(nil)
	_ caddyfile.Unmarshaler       = (*Portal)(nil)
)
