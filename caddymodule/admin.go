package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// defaultInviteTTL is the lifetime of an invite when the request gives none.
const defaultInviteTTL = 72 * time.Hour

// maxAdminBody bounds admin API request bodies.
const maxAdminBody = 1 << 20

// adminAPI is `admin.api.circle`, the circle's endpoints on Caddy's admin
// API (what the `caddy circle` subcommands talk to):
//
//	GET  /circle/status      node, members, replication, role, certificates, locks,
//	                         mesh (nat, relays, allocations, per-peer paths), services
//	POST /circle/users       {"username","password","name","email","groups"} -> 201 account
//	POST /circle/invites     {"groups","ttl"} -> {"url","expires"}; url is
//	                         https://<domain>[:https_port]/register?invite=TOKEN
//	POST /circle/rotate-key  -> {"kid"}
//
// Admin routers are provisioned before the apps and survive failed config
// loads, so the handlers look up the running circle app per request.
type adminAPI struct {
	logger *zap.Logger
	app    func() *App // the running app; nil when not started
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.circle",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision sets up the admin routes.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger().Named("admin.api.circle")
	a.app = activeApp.Load
	return nil
}

// Routes returns the admin routes of the circle.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/circle/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

func (a *adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	var (
		method  string
		handler func(http.ResponseWriter, *http.Request, *App) error
	)
	switch r.URL.Path {
	case "/circle/status":
		method, handler = http.MethodGet, a.handleStatus
	case "/circle/users":
		method, handler = http.MethodPost, a.handleUsers
	case "/circle/invites":
		method, handler = http.MethodPost, a.handleInvites
	case "/circle/rotate-key":
		method, handler = http.MethodPost, a.handleRotateKey
	default:
		return apiError(http.StatusNotFound, fmt.Errorf("resource not found: %s", r.URL.Path))
	}
	if r.Method != method {
		w.Header().Set("Allow", method)
		return apiError(http.StatusMethodNotAllowed, fmt.Errorf("method not allowed: %s", r.Method))
	}
	var app *App
	if a.app != nil {
		app = a.app()
	}
	if app == nil || app.Identity() == nil {
		return apiError(http.StatusServiceUnavailable, errors.New("the circle app is not running (is the circle global option configured?)"))
	}
	return handler(w, r, app)
}

func apiError(status int, err error) error {
	return caddy.APIError{HTTPStatus: status, Err: err}
}

// statusJSON is the body of GET /circle/status.
type statusJSON struct {
	Name        string          `json:"name"`
	Domain      string          `json:"domain"`
	Role        string          `json:"role"`
	Relay       string          `json:"relay,omitempty"`
	Members     []memberJSON    `json:"members"`
	Replication replicationJSON `json:"replication"`
	Accounts    int             `json:"accounts"`
	// Certificates are the certificates in the circle's storage (those
	// `storage circle` manages), with the node that stored each last and
	// the last issuance error of its names.
	Certificates []certJSON `json:"certificates"`
	// Locks are the storage's lock leases (certificate issuance, ARI...).
	Locks []lockJSON `json:"locks,omitempty"`
	// Mesh is this node's view of its paths to the other members.
	Mesh *meshJSON `json:"mesh,omitempty"`
	// Services are the circle services this node offers (by name).
	Services []serviceJSON `json:"services"`
	// MaxClockSkew is the configured maximum (a Go duration): members
	// whose clock is off by more are flagged clock_skewed.
	MaxClockSkew string `json:"max_clock_skew"`
}

type memberJSON struct {
	Name  string `json:"name"`
	Addr  string `json:"addr"`
	State string `json:"state"`
	// Path is how this node reaches the member: "self", "direct",
	// "punched", "relayed via NODE", "none" (no live connection), or ""
	// for members that are not alive.
	Path string `json:"path"`
	// ClockOffset is the member's wall clock minus this node's as measured
	// from probe acks (a Go duration, e.g. "-2m0.004s"); empty for this
	// node and while not measured.
	ClockOffset string `json:"clock_offset,omitempty"`
	// ClockSkewed: |ClockOffset| exceeds MaxClockSkew, so the records of
	// the node whose clock is ahead are kept aside by the other until its
	// clock catches up.
	ClockSkewed bool `json:"clock_skewed,omitempty"`
}

// meshJSON is the mesh section of the status.
type meshJSON struct {
	// Advertise is the address this node advertises to the circle.
	Advertise string `json:"advertise"`
	// NAT is what the path manager found out about this node's NAT:
	// "unknown", "none" (reachable), "cone" or "symmetric".
	NAT string `json:"nat"`
	// Public is this node's public (server-reflexive) address, if known.
	Public string `json:"public,omitempty"`
	// Relays are the known TURN relays of other nodes: node name -> TURN
	// address (this node's own is the top-level "relay").
	Relays map[string]string `json:"relays"`
	// Allocations are the TURN allocations this node holds.
	Allocations []allocationJSON `json:"allocations"`
	// Peers has one entry per other live member.
	Peers []peerJSON `json:"peers"`
}

type allocationJSON struct {
	Relay     string    `json:"relay"`
	Server    string    `json:"server"`
	RelayAddr string    `json:"relay_addr"`
	Since     time.Time `json:"since"`
	Expires   time.Time `json:"expires"`
}

type peerJSON struct {
	Name string `json:"name"`
	// Path is "direct", "punched", "relayed via NODE" or "none".
	Path          string     `json:"path"`
	Remote        string     `json:"remote,omitempty"`
	RTTMillis     float64    `json:"rtt_ms"`
	BytesSent     uint64     `json:"bytes_sent"`
	BytesReceived uint64     `json:"bytes_received"`
	Since         *time.Time `json:"since,omitempty"`
	LastError     string     `json:"last_error,omitempty"`
}

type serviceJSON struct {
	Name     string `json:"name"`
	Upstream string `json:"upstream"`
}

// pathLabel describes a path for people: "direct", "punched",
// "relayed via NODE", or "none" for the zero PathInfo.
func pathLabel(p relay.PathInfo) string {
	switch p.Kind {
	case "":
		return "none"
	case relay.PathRelayed:
		if p.Via != "" {
			return "relayed via " + p.Via
		}
		return "relayed"
	}
	return string(p.Kind)
}

// meshStatus builds the mesh section from the path manager.
func meshStatus(sn *sharedNode) *meshJSON {
	if sn == nil || sn.Manager() == nil {
		return nil
	}
	ms := sn.Manager().Status()
	out := &meshJSON{
		Advertise:   sn.Mesh().Addr().String(),
		NAT:         string(ms.NAT),
		Public:      ms.Public,
		Relays:      map[string]string{},
		Allocations: []allocationJSON{},
		Peers:       []peerJSON{},
	}
	for k, v := range ms.Relays {
		out.Relays[k] = v
	}
	for _, a := range ms.Allocations {
		out.Allocations = append(out.Allocations, allocationJSON{
			Relay: a.Relay, Server: a.Server, RelayAddr: a.RelayAddr,
			Since: a.Since.UTC(), Expires: a.Expires.UTC(),
		})
	}
	for _, p := range ms.Peers {
		pj := peerJSON{Name: p.Name, Path: "none", LastError: p.LastError}
		if p.Connected {
			pj.Path = pathLabel(p.Path)
			pj.Remote = p.Path.Remote
			pj.RTTMillis = float64(p.Path.RTT.Microseconds()) / 1000
			for _, q := range p.Paths {
				pj.BytesSent += q.BytesSent
				pj.BytesReceived += q.BytesReceived
			}
			since := p.Path.Since.UTC().Truncate(time.Second)
			pj.Since = &since
		}
		out.Peers = append(out.Peers, pj)
	}
	sort.Slice(out.Peers, func(i, j int) bool { return out.Peers[i].Name < out.Peers[j].Name })
	return out
}

type replicationJSON struct {
	Replicas   int  `json:"replicas"`
	AlivePeers int  `json:"alive_peers"`
	Healthy    bool `json:"healthy"`
	// UnderReplicated counts records written here that fewer than
	// replicas nodes are known to hold (re-sent as nodes return).
	UnderReplicated int `json:"under_replicated"`
	Stats           any `json:"stats"`
}

func (a *adminAPI) handleStatus(w http.ResponseWriter, r *http.Request, app *App) error {
	repl := app.Replicator()
	st := statusJSON{
		Name:   app.NodeName(),
		Domain: app.Domain(),
		Role:   "member",
		Relay:  app.Relay,
	}
	if app.node != nil && app.node.TURNAddr() != "" {
		st.Role = "member and relay"
		st.Relay = app.node.TURNAddr()
	}
	st.Mesh = meshStatus(app.node)
	paths := map[string]string{}
	if st.Mesh != nil {
		for _, p := range st.Mesh.Peers {
			paths[p.Name] = p.Path
		}
	}
	st.Services = []serviceJSON{}
	if app.node != nil {
		for name, up := range app.node.Services().Current() {
			st.Services = append(st.Services, serviceJSON{Name: name, Upstream: up})
		}
		sort.Slice(st.Services, func(i, j int) bool { return st.Services[i].Name < st.Services[j].Name })
	}
	alive := 0
	maxSkew := app.maxClockSkew()
	st.MaxClockSkew = maxSkew.String()
	for _, m := range repl.Members() {
		mj := memberJSON{Name: m.Name, Addr: m.Addr, State: string(m.State), Path: "none"}
		if m.ClockMeasured {
			mj.ClockOffset = m.ClockOffset.Round(time.Millisecond).String()
			mj.ClockSkewed = m.ClockOffset > maxSkew || m.ClockOffset < -maxSkew
		}
		if p, ok := paths[m.Name]; ok {
			mj.Path = p
		}
		if m.Name == app.NodeName() {
			mj.Path = "self"
		} else if m.State == replicator.StateAlive {
			alive++
		}
		if m.State != replicator.StateAlive && mj.Path != "self" {
			mj.Path = ""
		}
		st.Members = append(st.Members, mj)
	}
	sort.Slice(st.Members, func(i, j int) bool { return st.Members[i].Name < st.Members[j].Name })
	stats := repl.Stats()
	st.Replication = replicationJSON{
		Replicas:        app.Replicas,
		AlivePeers:      alive,
		Healthy:         alive+1 >= app.Replicas && stats.UnderReplicated == 0,
		UnderReplicated: stats.UnderReplicated,
		Stats:           stats,
	}
	if accts, err := app.Identity().Accounts(); err == nil {
		st.Accounts = len(accts)
	}
	st.Certificates = certificatesStatus(repl)
	st.Locks = locksStatus(repl)
	return writeJSON(w, http.StatusOK, st)
}

// newUserRequest is the body of POST /circle/users.
type newUserRequest struct {
	Username string   `json:"username"`
	Password string   `json:"password"`
	Name     string   `json:"name,omitempty"`
	Email    string   `json:"email,omitempty"`
	Groups   []string `json:"groups,omitempty"`
}

// accountJSON is an account as the admin API shows it (no secrets).
type accountJSON struct {
	ID       string   `json:"id"`
	Username string   `json:"username"`
	Name     string   `json:"name,omitempty"`
	Email    string   `json:"email,omitempty"`
	Groups   []string `json:"groups"`
}

func (a *adminAPI) handleUsers(w http.ResponseWriter, r *http.Request, app *App) error {
	var req newUserRequest
	if err := decodeBody(r, &req, false); err != nil {
		return err
	}
	if req.Username == "" || req.Password == "" {
		return apiError(http.StatusBadRequest, errors.New("username and password are required"))
	}
	acct, err := app.Identity().CreateAccount(r.Context(), identity.NewAccount{
		Username: req.Username,
		Password: req.Password,
		Name:     req.Name,
		Email:    req.Email,
		Groups:   req.Groups,
	})
	if err != nil {
		return identityError("creating account", err)
	}
	a.logger.Info("account created", zap.String("username", acct.Username), zap.Strings("groups", acct.Groups))
	groups := acct.Groups
	if groups == nil {
		groups = []string{}
	}
	return writeJSON(w, http.StatusCreated, accountJSON{
		ID: acct.ID, Username: acct.Username, Name: acct.Name, Email: acct.Email, Groups: groups,
	})
}

// inviteRequest is the body of POST /circle/invites.
type inviteRequest struct {
	Groups []string `json:"groups,omitempty"`
	// TTL is a duration such as "72h" or "3d". Default: 72h.
	TTL string `json:"ttl,omitempty"`
}

type inviteJSON struct {
	URL     string    `json:"url"`
	Expires time.Time `json:"expires"`
}

func (a *adminAPI) handleInvites(w http.ResponseWriter, r *http.Request, app *App) error {
	var req inviteRequest
	if err := decodeBody(r, &req, true); err != nil { // no body: all defaults
		return err
	}
	ttl := defaultInviteTTL
	if req.TTL != "" {
		d, err := caddy.ParseDuration(req.TTL)
		if err != nil || d <= 0 {
			return apiError(http.StatusBadRequest, fmt.Errorf("ttl %q is not a positive duration", req.TTL))
		}
		ttl = d
	}
	token, err := app.Identity().CreateInvite(r.Context(), req.Groups, ttl, "admin-api")
	if err != nil {
		return identityError("creating invite", err)
	}
	a.logger.Info("invite created", zap.Strings("groups", req.Groups), zap.Duration("ttl", ttl))
	return writeJSON(w, http.StatusOK, inviteJSON{URL: inviteLink(app.portalHost(), token), Expires: time.Now().Add(ttl).UTC().Truncate(time.Second)})
}

func (a *adminAPI) handleRotateKey(w http.ResponseWriter, r *http.Request, app *App) error {
	kid, err := app.Identity().RotateKey(r.Context())
	if err != nil {
		return identityError("rotating signing key", err)
	}
	a.logger.Info("signing key rotated", zap.String("kid", kid))
	return writeJSON(w, http.StatusOK, map[string]string{"kid": kid})
}

// identityError maps identity errors to admin API errors: the client's
// mistakes are 4xx, only the service's own failures are 5xx.
func identityError(what string, err error) error {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, identity.ErrUsernameTaken):
		status = http.StatusConflict
	case errors.Is(err, identity.ErrInvalidUsername),
		errors.Is(err, identity.ErrWeakPassword),
		errors.Is(err, identity.ErrInvalidInput):
		status = http.StatusBadRequest
	case errors.Is(err, replicator.ErrAckTimeout), errors.Is(err, replicator.ErrClockSkew):
		// The circle could not take the write now (peers unreachable, or
		// this node's clock is too far ahead of theirs): try again later.
		status = http.StatusServiceUnavailable
	}
	return apiError(status, fmt.Errorf("%s: %w", what, err))
}

// decodeBody decodes a JSON request body into v; every mistake is a 400.
// With allowEmpty, an empty body leaves v as it is.
func decodeBody(r *http.Request, v any, allowEmpty bool) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return apiError(http.StatusUnsupportedMediaType, fmt.Errorf("content type %q is not application/json", ct))
	}
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			if allowEmpty {
				return nil
			}
			return apiError(http.StatusBadRequest, errors.New("empty request body, expected JSON"))
		}
		return apiError(http.StatusBadRequest, fmt.Errorf("decoding request: %w", err))
	}
	if dec.More() {
		return apiError(http.StatusBadRequest, errors.New("request body has data after the JSON object"))
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// Interface guards
var (
	_ caddy.Module      = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
	_ caddy.AdminRouter = (*adminAPI)(nil)
)

// inviteLink is the registration link of an invite token on the portal at
// host (the domain, with the HTTPS port when it is not 443).
func inviteLink(host, token string) string {
	u := url.URL{Scheme: "https", Host: host, Path: "/register", RawQuery: url.Values{"invite": {token}}.Encode()}
	return u.String()
}
