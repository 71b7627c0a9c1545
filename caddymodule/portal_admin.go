package caddymodule

import (
	"errors"
	"html/template"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
)

// adminGroup is the group whose members get the portal's /admin page.
const adminGroup = "admins"

func init() {
	pageTemplates["admin"] = template.Must(template.ParseFS(portalFS,
		"portal_templates/layout.html", "portal_templates/admin.html"))
}

// inviteTTLs are the validities the invite form offers.
var inviteTTLs = []struct {
	Value, Label string
	TTL          time.Duration
}{
	{"1d", "1 day", 24 * time.Hour},
	{"3d", "3 days", 72 * time.Hour},
	{"7d", "7 days", 7 * 24 * time.Hour},
}

// defaultInviteChoice is the preselected validity (defaultInviteTTL).
const defaultInviteChoice = "3d"

// adminView is what the admin template gets besides pageData.
type adminView struct {
	Accounts      []adminAccountView
	TTLs          []ttlOption
	InviteURL     string // a new invite, shown once
	InviteGroups  []string
	InviteExpires string
	FormGroups    string // the invite form's groups, typed back after an error
}

type ttlOption struct {
	Value, Label string
	Selected     bool
}

// adminAccountView is an account as the admin page lists it.
type adminAccountView struct {
	ID, Username, Name, Email string
	Groups                    []string
	GroupsText                string // for the edit field
	Disabled, Self            bool
	Created                   string
}

// adminNotices are the messages of /admin?done=...
var adminNotices = map[string]string{
	"groups":     "The groups were saved. The member's apps see them at their next request.",
	"disabled":   "The account was disabled and signed out everywhere.",
	"enabled":    "The account was enabled. Its member can sign in again.",
	"logout-all": "The account was signed out everywhere.",
}

// serveAdmin routes /admin and /admin/....
func (p *Portal) serveAdmin(w http.ResponseWriter, r *http.Request) error {
	get := r.Method == http.MethodGet || r.Method == http.MethodHead
	switch path := r.URL.Path; path {
	case "/admin":
		if !get {
			return p.methodNotAllowed(w, "GET, HEAD")
		}
		p.adminPage(w, r)
	case "/admin/invite", "/admin/groups", "/admin/disable", "/admin/enable", "/admin/logout-all":
		if r.Method != http.MethodPost {
			return p.methodNotAllowed(w, "POST")
		}
		p.adminAction(w, r, strings.TrimPrefix(path, "/admin/"))
	default:
		renderPage(w, http.StatusNotFound, "message", &pageData{
			Title: p.Title, Heading: "Not found", Message: "There is no such page.",
			Link: "/admin", LinkText: "Go to the admin page",
		})
	}
	return nil
}

// signedInAdmin returns the session claims and current account of an admin.
// Visitors who are not signed in are sent to the login page, members
// outside the admins group get a 403 page; both return false. The current
// account's groups decide, not the token's.
func (p *Portal) signedInAdmin(w http.ResponseWriter, r *http.Request) (identity.Claims, identity.Account, bool) {
	c, a, ok := p.signedInAccountAt(w, r, "/admin")
	if !ok {
		return c, a, false
	}
	if a.Disabled || !slices.Contains(a.Groups, adminGroup) {
		renderPage(w, http.StatusForbidden, "message", &pageData{
			Title: p.Title, Heading: "Not for this account",
			Message: "You are signed in as " + a.Username + ", but this page is only for members of the group \"" +
				adminGroup + "\". Ask an admin of the circle if you need something changed.",
			Link: "/account", LinkText: "Go to your account",
		})
		return c, a, false
	}
	return c, a, true
}

func (p *Portal) adminPage(w http.ResponseWriter, r *http.Request) {
	_, a, ok := p.signedInAdmin(w, r)
	if !ok {
		return
	}
	p.renderAdmin(w, r, a, http.StatusOK, "", adminNotices[r.URL.Query().Get("done")], nil)
}

// renderAdmin writes the admin page. v carries a new invite or the invite
// form's input; nil for none.
func (p *Portal) renderAdmin(w http.ResponseWriter, r *http.Request, me identity.Account, status int, errMsg, notice string, v *adminView) {
	if v == nil {
		v = &adminView{}
	}
	d := &pageData{
		Title: p.Title, Heading: "Circle admin", CSRF: p.ensureCSRF(w, r), Wide: true,
		Error: errMsg, Notice: notice, Admin: v,
	}
	choice := r.PostForm.Get("ttl")
	if _, ok := inviteTTL(choice); !ok || v.InviteURL != "" {
		choice = defaultInviteChoice
	}
	for _, t := range inviteTTLs {
		v.TTLs = append(v.TTLs, ttlOption{Value: t.Value, Label: t.Label, Selected: t.Value == choice})
	}
	accounts, err := p.ident.Accounts()
	if err != nil {
		p.logger.Warn("listing accounts", zap.Error(err))
		if d.Error == "" {
			d.Error = "The accounts could not be listed just now."
		}
	}
	for _, acct := range accounts {
		v.Accounts = append(v.Accounts, adminAccountView{
			ID: acct.ID, Username: acct.Username, Name: acct.Name, Email: acct.Email,
			Groups: acct.Groups, GroupsText: strings.Join(acct.Groups, ", "),
			Disabled: acct.Disabled, Self: acct.ID == me.ID,
			Created: acct.Created.UTC().Format("2 Jan 2006"),
		})
	}
	renderPage(w, status, "admin", d)
}

// inviteTTL maps a validity choice of the invite form to its duration.
func inviteTTL(choice string) (time.Duration, bool) {
	for _, t := range inviteTTLs {
		if t.Value == choice {
			return t.TTL, true
		}
	}
	return 0, false
}

// splitGroups splits a comma-separated list of groups, dropping empty
// entries; identity validates and normalises the names.
func splitGroups(s string) []string {
	var out []string
	for _, g := range strings.Split(s, ",") {
		if g = strings.TrimSpace(g); g != "" {
			out = append(out, g)
		}
	}
	return out
}

// inviteURL is the registration link of an invite token, as the admin
// API's POST /circle/invites gives it: the portal's host from the running
// circle app's portalHost (with the HTTPS port when it is not 443). The
// app is read through activeApp, whose atomic store follows Start's
// setting of the port; before that (or in tests without an app) it is the
// bare domain.
func (p *Portal) inviteURL(token string) string {
	host := p.domain
	if a := activeApp.Load(); a != nil && a.Domain() == p.domain {
		host = a.portalHost()
	}
	return inviteLink(host, token)
}

const badGroupsMsg = "Groups are comma-separated names of 1 to 64 characters: letters, digits, dot, dash or underscore, starting with a letter or digit (at most 64 groups)."

func (p *Portal) adminAction(w http.ResponseWriter, r *http.Request, action string) {
	ferr := p.readForm(w, r)
	_, me, ok := p.signedInAdmin(w, r)
	if !ok {
		return
	}
	fail := func(status int, msg string) { p.renderAdmin(w, r, me, status, msg, "", nil) }
	if ferr != nil {
		fail(ferr.status, ferr.msg)
		return
	}
	ctx := r.Context()
	unavailable := func(err error) {
		p.logger.Error("admin action", zap.String("action", action), zap.String("admin", me.Username), zap.Error(err))
		fail(http.StatusServiceUnavailable, "That could not be saved just now. Please try again.")
	}
	done := func(code string) {
		setSecurityHeaders(w.Header())
		w.Header().Set("Location", "/admin?done="+code)
		w.WriteHeader(http.StatusSeeOther)
	}

	if action == "invite" {
		groupsText := r.PostForm.Get("groups")
		v := &adminView{FormGroups: groupsText}
		ttl, ok := inviteTTL(r.PostForm.Get("ttl"))
		if !ok {
			p.renderAdmin(w, r, me, http.StatusBadRequest, "Please choose how long the invite is valid: 1, 3 or 7 days.", "", v)
			return
		}
		groups := splitGroups(groupsText)
		token, err := p.ident.CreateInvite(ctx, groups, ttl, me.Username)
		switch {
		case err == nil:
		case errors.Is(err, identity.ErrInvalidInput):
			p.renderAdmin(w, r, me, http.StatusBadRequest, badGroupsMsg, "", v)
			return
		default:
			p.logger.Error("admin action", zap.String("action", action), zap.String("admin", me.Username), zap.Error(err))
			p.renderAdmin(w, r, me, http.StatusServiceUnavailable, "The invite could not be created just now. Please try again.", "", v)
			return
		}
		p.logger.Info("invite created", zap.String("admin", me.Username), zap.Strings("groups", groups), zap.Duration("ttl", ttl))
		// The link is shown on this response only (not put in a redirect
		// URL, where it would stay in the history and logs).
		inv, _ := p.ident.CheckInvite(token)
		v = &adminView{
			InviteURL: p.inviteURL(token), InviteGroups: inv.Groups,
			InviteExpires: p.now().Add(ttl).UTC().Format("2 Jan 2006 15:04 UTC"),
		}
		p.renderAdmin(w, r, me, http.StatusOK, "", "The invite was created. Send the link below to your friend: it is shown only once and works for one registration.", v)
		return
	}

	// The other actions are on one account.
	id := r.PostForm.Get("id")
	target, err := p.ident.Account(id)
	switch {
	case err == nil:
	case errors.Is(err, identity.ErrNotFound), errors.Is(err, identity.ErrInvalidInput):
		fail(http.StatusBadRequest, "That account does not exist (any more). Please choose an account from the list.")
		return
	default:
		unavailable(err)
		return
	}
	self := target.ID == me.ID
	log := func(msg string) {
		p.logger.Info(msg, zap.String("admin", me.Username), zap.String("username", target.Username))
	}

	switch action {
	case "groups":
		if !r.PostForm.Has("groups") {
			fail(http.StatusBadRequest, "The form has no groups field. Please use the form on this page.")
			return
		}
		groups := splitGroups(r.PostForm.Get("groups"))
		if self && !slices.ContainsFunc(groups, func(g string) bool { return strings.EqualFold(g, adminGroup) }) {
			fail(http.StatusBadRequest, "You cannot remove yourself from the group \""+adminGroup+"\": the circle could be left without an admin. Ask another admin to do it.")
			return
		}
		switch err := p.ident.SetGroups(ctx, target.ID, groups); {
		case err == nil:
			log("groups changed")
			done("groups")
		case errors.Is(err, identity.ErrInvalidInput):
			fail(http.StatusBadRequest, badGroupsMsg)
		default:
			unavailable(err)
		}
	case "disable", "enable":
		disable := action == "disable"
		if self && disable {
			fail(http.StatusBadRequest, "You cannot disable your own account: the circle could be left without an admin. Ask another admin to do it.")
			return
		}
		if err := p.ident.SetDisabled(ctx, target.ID, disable); err != nil {
			unavailable(err)
			return
		}
		log("account " + action + "d")
		done(action + "d")
	case "logout-all":
		if err := p.ident.RevokeAll(ctx, target.ID); err != nil {
			unavailable(err)
			return
		}
		log("signed out everywhere by an admin")
		if self {
			p.logoutRedirect(w, r)
			return
		}
		done("logout-all")
	}
}
