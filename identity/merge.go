package identity

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Account and invite records merge per field.
//
// Several nodes edit the same account record, also while they are cut off
// from each other, so the replicated store must not keep one whole record
// and drop the other: it joins the two with the functions MergeFuncs
// returns. Every edit stamps what it changed with a stamp (hybrid-clock
// time and node), and the join takes, per field group, the value with the
// higher stamp; sets (groups, disables, invite uses) merge per element.
// The join is a semilattice (commutative, associative, idempotent) and
// byte-deterministic, as replicator.MergeFunc requires. The security rules
// (docs/INTERNALS.md, "Account merge"):
//
//   - Each disable is an element of a grow-only set; an enable lifts the
//     disables it has seen (a second grow-only set). The account is
//     disabled while some disable is not lifted. So a disable is never
//     undone by a concurrent edit of another field, nor by a concurrent
//     enable that did not see it; a password change concurrent with a
//     disable does not re-enable; an enable made after the disable
//     reached its node does enable.
//   - Groups: one stamp per group, added or removed (last writer wins per
//     group, a removal wins a tie), so concurrent edits of different groups
//     both survive.
//   - An invite's uses are a grow-only set; a use may only be released
//     (by the registration that made it, when it failed). The invite is
//     used while some use is not released; the earliest such use owns it.

// stamp orders the edits of one field (or field group) of a record. T is a
// hybrid clock reading: milliseconds since the Unix epoch << 16 | a counter,
// always higher than every stamp already in the record it is written
// into. Node (Config.Node) breaks ties. Records written before stamps
// existed read as zero stamps.
type stamp struct {
	T    uint64 `json:"t"`
	Node string `json:"n,omitempty"`
}

func (a stamp) compare(b stamp) int {
	if c := cmp.Compare(a.T, b.T); c != 0 {
		return c
	}
	return strings.Compare(a.Node, b.Node)
}

// groupStamp is the state of one group of an account.
type groupStamp struct {
	stamp
	Removed bool `json:"del,omitempty"`
}

// accountStamps are the merge metadata of an account record.
type accountStamps struct {
	Username stamp                 `json:"username"`           // Username and MustRename
	Profile  stamp                 `json:"profile"`            // Name and Email
	Password stamp                 `json:"password"`           // PasswordHash
	Groups   map[string]groupStamp `json:"groups,omitempty"`   // every group the account ever had
	Disables []stamp               `json:"disables,omitempty"` // one per disable, sorted
	Lifted   []stamp               `json:"lifted,omitempty"`   // disables undone by an enable, sorted
}

// nextStamp returns a stamp for an edit of a record whose highest stamp is
// last: now, or just above last if the clock is behind it.
func (s *Service) nextStamp(last stamp) stamp {
	t := uint64(max(s.cfg.Now().UnixMilli(), 0)) << 16
	if t <= last.T {
		t = last.T + 1
	}
	return stamp{T: t, Node: s.cfg.Node}
}

// normalize gives a record without stamps (written before they existed)
// zero stamps that say what it says, and sorts the stamp sets.
func (r *accountRecord) normalize() *accountStamps {
	if r.Stamps == nil {
		st := &accountStamps{}
		for _, g := range r.Groups {
			if st.Groups == nil {
				st.Groups = map[string]groupStamp{}
			}
			st.Groups[g] = groupStamp{}
		}
		if r.Disabled {
			st.Disables = []stamp{{}}
		}
		r.Stamps = st
	}
	st := r.Stamps
	st.Disables = sortStamps(st.Disables)
	st.Lifted = sortStamps(st.Lifted)
	return st
}

// derive sets the fields that follow from the stamps (Disabled, Groups),
// which are stored too, for readers that do not know stamps.
func (r *accountRecord) derive() {
	st := r.normalize()
	r.Disabled = false
	for _, d := range st.Disables {
		if _, lifted := slices.BinarySearchFunc(st.Lifted, d, stamp.compare); !lifted {
			r.Disabled = true
			break
		}
	}
	r.Groups = nil
	for g, gs := range st.Groups {
		if !gs.Removed {
			r.Groups = append(r.Groups, g)
		}
	}
	slices.Sort(r.Groups)
}

// lastStamp is the highest stamp in the record.
func (r *accountRecord) lastStamp() stamp {
	st := r.normalize()
	last := slices.MaxFunc([]stamp{st.Username, st.Profile, st.Password}, stamp.compare)
	for _, g := range st.Groups {
		last = maxStamp(last, g.stamp)
	}
	for _, d := range slices.Concat(st.Disables, st.Lifted) {
		last = maxStamp(last, d)
	}
	return last
}

func (r *accountRecord) setUsername(name string, mustRename bool, at stamp) {
	r.normalize().Username = at
	r.Username, r.MustRename = name, mustRename
}

func (r *accountRecord) setProfile(name, email string, at stamp) {
	r.normalize().Profile = at
	r.Name, r.Email = name, email
}

func (r *accountRecord) setPassword(phc string, at stamp) {
	r.normalize().Password = at
	r.PasswordHash = phc
}

// setGroups makes groups (normalised) the live groups: groups that were
// not live are added, live groups not in it are removed, both at at;
// groups that stay keep their stamps.
func (r *accountRecord) setGroups(groups []string, at stamp) {
	st := r.normalize()
	if st.Groups == nil {
		st.Groups = map[string]groupStamp{}
	}
	for g, gs := range st.Groups {
		if !gs.Removed && !slices.Contains(groups, g) {
			st.Groups[g] = groupStamp{stamp: at, Removed: true}
		}
	}
	for _, g := range groups {
		if gs, ok := st.Groups[g]; !ok || gs.Removed {
			st.Groups[g] = groupStamp{stamp: at}
		}
	}
	r.derive()
}

// setDisabled disables (a new disable at at) or enables (lifts every
// disable the record holds).
func (r *accountRecord) setDisabled(disabled bool, at stamp) {
	st := r.normalize()
	if disabled {
		st.Disables = sortStamps(append(st.Disables, at))
	} else {
		st.Lifted = sortStamps(slices.Concat(st.Lifted, st.Disables))
	}
	r.derive()
}

// encodeAccount is the one encoding of account records: normalised,
// derived fields recomputed, current format version. Equal records encode
// to equal bytes (the store's merge compares them).
func encodeAccount(rec accountRecord) ([]byte, error) {
	rec.V = accountRecordVersion
	rec.derive()
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("identity: encoding account: %w", err)
	}
	return b, nil
}

// mergeAccounts joins two values of one accounts record.
func mergeAccounts(a, b []byte) ([]byte, error) {
	var x, y accountRecord
	if err := decodeJSON("account", a, &x); err != nil {
		return nil, err
	}
	if err := decodeJSON("account", b, &y); err != nil {
		return nil, err
	}
	if x.ID != y.ID {
		return nil, fmt.Errorf("identity: merging records of accounts %q and %q: %w", x.ID, y.ID, ErrInvalidInput)
	}
	sx, sy := x.normalize(), y.normalize()
	out := accountRecord{ID: x.ID, Stamps: &accountStamps{}}
	so := out.Stamps
	// Field groups: the higher stamp wins; equal stamps (records without
	// stamps) fall back to comparing the values, so the result does not
	// depend on the argument order.
	switch pickStamped(sx.Username, sy.Username, x.Username+"\x00"+fmt.Sprint(x.MustRename), y.Username+"\x00"+fmt.Sprint(y.MustRename)) {
	case 0:
		out.Username, out.MustRename, so.Username = x.Username, x.MustRename, sx.Username
	default:
		out.Username, out.MustRename, so.Username = y.Username, y.MustRename, sy.Username
	}
	switch pickStamped(sx.Profile, sy.Profile, x.Name+"\x00"+x.Email, y.Name+"\x00"+y.Email) {
	case 0:
		out.Name, out.Email, so.Profile = x.Name, x.Email, sx.Profile
	default:
		out.Name, out.Email, so.Profile = y.Name, y.Email, sy.Profile
	}
	switch pickStamped(sx.Password, sy.Password, x.PasswordHash, y.PasswordHash) {
	case 0:
		out.PasswordHash, so.Password = x.PasswordHash, sx.Password
	default:
		out.PasswordHash, so.Password = y.PasswordHash, sy.Password
	}
	for g, gs := range sx.Groups {
		if so.Groups == nil {
			so.Groups = map[string]groupStamp{}
		}
		so.Groups[g] = gs
	}
	for g, gs := range sy.Groups {
		if so.Groups == nil {
			so.Groups = map[string]groupStamp{}
		}
		if cur, ok := so.Groups[g]; !ok || gs.compare(cur.stamp) > 0 || (gs.stamp == cur.stamp && gs.Removed) {
			so.Groups[g] = gs
		}
	}
	so.Disables = sortStamps(slices.Concat(sx.Disables, sy.Disables))
	so.Lifted = sortStamps(slices.Concat(sx.Lifted, sy.Lifted))
	out.Created = earliest(x.Created, y.Created)
	out.Updated = latest(x.Updated, y.Updated)
	out.SessionGen = max(x.SessionGen, y.SessionGen) // only grows: RevokeAll increments it
	return encodeAccount(out)
}

// pickStamped returns 0 if the value of stamp a wins, 1 if b's: the higher
// stamp, or on equal stamps the greater value.
func pickStamped(a, b stamp, va, vb string) int {
	if c := a.compare(b); c != 0 {
		if c > 0 {
			return 0
		}
		return 1
	}
	if va >= vb {
		return 0
	}
	return 1
}

// inviteUse is one registration with an invite.
type inviteUse struct {
	stamp
	Account  string    `json:"account"`
	At       time.Time `json:"at"`
	Released bool      `json:"released,omitempty"` // the registration failed and gave the invite back
}

// normalizeUses gives an invite written before uses were recorded the use
// it says it had, and sorts the uses.
func (r *inviteRecord) normalizeUses() {
	if r.Uses == nil && r.Used {
		r.Uses = []inviteUse{{Account: r.UsedBy, At: r.UsedAt}}
	}
	slices.SortFunc(r.Uses, func(a, b inviteUse) int { return a.compare(b.stamp) })
}

// deriveUse sets Used, UsedBy and UsedAt from the uses: the earliest use
// not released owns the invite.
func (r *inviteRecord) deriveUse() {
	r.normalizeUses()
	r.Used, r.UsedBy, r.UsedAt = false, "", time.Time{}
	for _, u := range r.Uses {
		if !u.Released {
			r.Used, r.UsedBy, r.UsedAt = true, u.Account, u.At
			return
		}
	}
}

// lastUseStamp is the highest stamp among the invite's uses.
func (r *inviteRecord) lastUseStamp() stamp {
	var last stamp
	for _, u := range r.Uses {
		last = maxStamp(last, u.stamp)
	}
	return last
}

// encodeInvite is the one encoding of invite records.
func encodeInvite(rec inviteRecord) ([]byte, error) {
	rec.V = inviteRecordVersion
	rec.deriveUse()
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("identity: encoding invite: %w", err)
	}
	return b, nil
}

// mergeInvites joins two values of one invites record. What the invite
// grants is written once, at creation; uses merge as a set (released if
// released on either side).
func mergeInvites(a, b []byte) ([]byte, error) {
	var x, y inviteRecord
	if err := decodeJSON("invite", a, &x); err != nil {
		return nil, err
	}
	if err := decodeJSON("invite", b, &y); err != nil {
		return nil, err
	}
	x.normalizeUses()
	y.normalizeUses()
	out := x
	// The grant never changes after creation; should two ever differ, the
	// result must still not depend on the argument order.
	gx, _ := json.Marshal(inviteRecord{Groups: x.Groups, Expires: x.Expires, CreatedBy: x.CreatedBy, Created: x.Created})
	gy, _ := json.Marshal(inviteRecord{Groups: y.Groups, Expires: y.Expires, CreatedBy: y.CreatedBy, Created: y.Created})
	if string(gy) < string(gx) {
		out = y
	}
	out.Uses = nil
	for _, u := range slices.Concat(x.Uses, y.Uses) {
		i := slices.IndexFunc(out.Uses, func(o inviteUse) bool { return o.stamp == u.stamp && o.Account == u.Account })
		if i < 0 {
			out.Uses = append(out.Uses, u)
			continue
		}
		out.Uses[i].Released = out.Uses[i].Released || u.Released
	}
	slices.SortFunc(out.Uses, func(a, b inviteUse) int {
		if c := a.compare(b.stamp); c != 0 {
			return c
		}
		return strings.Compare(a.Account, b.Account)
	})
	return encodeInvite(out)
}

// MergeFuncs returns the join functions of the buckets whose records
// several nodes edit (accounts, invites), for the replicated store's
// Config.Merge (caddymodule converts them to replicator.MergeFunc). Each is
// deterministic, commutative, associative and idempotent.
func MergeFuncs() map[string]func(a, b []byte) ([]byte, error) {
	return map[string]func(a, b []byte) ([]byte, error){
		bucketAccounts: mergeAccounts,
		bucketInvites:  mergeInvites,
	}
}

func sortStamps(s []stamp) []stamp {
	slices.SortFunc(s, stamp.compare)
	return slices.Compact(s)
}

func maxStamp(a, b stamp) stamp {
	if a.compare(b) >= 0 {
		return a
	}
	return b
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
