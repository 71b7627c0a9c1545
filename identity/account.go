package identity

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/mail"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Account is a member's account as callers see it. The password hash is
// stored with it but never returned.
type Account struct {
	ID         string    // 32 lowercase hex characters (16 random bytes)
	Username   string    // normalised: lowercase [a-z0-9._-]
	Name       string    // display name, may be empty
	Email      string    // may be empty
	Groups     []string  // sorted, lowercase
	Disabled   bool      // a disabled account cannot log in and its sessions are revoked
	MustRename bool      // set when the account lost its username in a collision; cleared by Rename
	Created    time.Time // when the account was created
}

// NewAccount is the input of CreateAccount and Register.
type NewAccount struct {
	Username string
	Password string
	Name     string
	Email    string
	Groups   []string // ignored by Register: the invite decides
}

// accountRecordVersion is the format version of accounts bucket values.
const accountRecordVersion = 1

// accountRecord is the value stored under accounts/<id>, as JSON. The
// password is a PHC string: $argon2id$v=19$m=<KiB>,t=<n>,p=<n>$<salt>$<hash>.
type accountRecord struct {
	V            int       `json:"v"`
	ID           string    `json:"id"`
	Username     string    `json:"username"`
	Name         string    `json:"name,omitempty"`
	Email        string    `json:"email,omitempty"`
	Groups       []string  `json:"groups,omitempty"`
	Disabled     bool      `json:"disabled,omitempty"`
	MustRename   bool      `json:"must_rename,omitempty"`
	PasswordHash string    `json:"password_hash"`
	Created      time.Time `json:"created"`
	Updated      time.Time `json:"updated"`
	// Stamps say when each field group was last edited, for the merge of
	// concurrent edits (merge.go). Disabled and Groups are derived from
	// them and stored for readers that do not know stamps. Absent in
	// records written before stamps existed.
	Stamps *accountStamps `json:"stamps,omitempty"`
	// SessionGen is the account's session generation: RevokeAll
	// increments it, and tokens and session records carry the generation
	// current when they were issued; lower ones are revoked. It only grows
	// (merge: the maximum). See RevokeAll.
	SessionGen uint64 `json:"session_gen,omitempty"`
}

func (r accountRecord) account() Account {
	return Account{
		ID: r.ID, Username: r.Username, Name: r.Name, Email: r.Email,
		Groups: slices.Clone(r.Groups), Disabled: r.Disabled, MustRename: r.MustRename, Created: r.Created,
	}
}

// Limits on account fields.
const (
	minUsernameLen = 2
	maxUsernameLen = 32
	// maxLookupLen allows the longest generated collision name:
	// 32 + "-" + 32 hex.
	maxLookupLen = 2*maxUsernameLen + 1
	maxNameBytes = 128
	maxEmailLen  = 254
	maxGroupLen  = 64
	maxGroups    = 64
)

// NormalizeUsername returns the canonical form of a username chosen by a
// person: lowercased ASCII, 2-32 characters of [a-z0-9._-], starting with a
// letter or digit. Otherwise it returns ErrInvalidUsername.
func NormalizeUsername(s string) (string, error) {
	n, ok := normalizeName(strings.TrimSpace(s), minUsernameLen, maxUsernameLen)
	if !ok {
		return "", ErrInvalidUsername
	}
	return n, nil
}

// normalizeName lowercases an ASCII name and checks the username charset
// ([a-zA-Z0-9._-], starting with a letter or digit) and length.
func normalizeName(s string, minLen, maxLen int) (string, bool) {
	if len(s) < minLen || len(s) > maxLen {
		return "", false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c >= 'A' && c <= 'Z':
		case (c == '.' || c == '_' || c == '-') && i > 0:
		default:
			return "", false
		}
	}
	return strings.ToLower(s), true
}

// normalizeGroups lowercases, validates, sorts and de-duplicates groups.
func normalizeGroups(groups []string) ([]string, error) {
	if len(groups) > maxGroups {
		return nil, fmt.Errorf("identity: more than %d groups: %w", maxGroups, ErrInvalidInput)
	}
	out := make([]string, 0, len(groups))
	for _, g := range groups {
		n, ok := normalizeName(strings.TrimSpace(g), 1, maxGroupLen)
		if !ok {
			return nil, fmt.Errorf("identity: invalid group name %q: %w", g, ErrInvalidInput)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// checkProfile validates and cleans a display name and email address.
func checkProfile(name, email string) (string, string, error) {
	name = strings.TrimSpace(name)
	email = strings.TrimSpace(email)
	if len(name) > maxNameBytes || !utf8.ValidString(name) || strings.IndexFunc(name, unicode.IsControl) >= 0 {
		return "", "", fmt.Errorf("identity: invalid name: %w", ErrInvalidInput)
	}
	if email != "" {
		a, err := mail.ParseAddress(email)
		if len(email) > maxEmailLen || err != nil || a.Address != email || a.Name != "" {
			return "", "", fmt.Errorf("identity: invalid email address: %w", ErrInvalidInput)
		}
	}
	return name, email, nil
}

func newAccountID() string { return hex.EncodeToString(randomBytes(16)) }

// validAccountID reports whether id looks like an account id (so it can
// safely be used as a key).
func validAccountID(id string) bool {
	if len(id) != 32 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil && strings.ToLower(id) == id
}

// loadAccount reads an account record from the store.
func (s *Service) loadAccount(id string) (accountRecord, error) {
	var rec accountRecord
	if !validAccountID(id) {
		return rec, fmt.Errorf("identity: account %q: %w", id, ErrNotFound)
	}
	b, err := s.store.Get(bucketAccounts, id)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return rec, fmt.Errorf("identity: account %s: %w", id, ErrNotFound)
		}
		return rec, fmt.Errorf("identity: reading account %s: %w", id, err)
	}
	if err := decodeJSON("account "+id, b, &rec); err != nil {
		return rec, err
	}
	if rec.ID != id {
		return rec, fmt.Errorf("identity: account record %s carries id %q: %w", id, rec.ID, ErrInvalidInput)
	}
	return rec, nil
}

// usernameOwner returns the account id the usernames index maps name to,
// or "" if there is none.
func (s *Service) usernameOwner(name string) (string, error) {
	b, err := s.store.Get(bucketUsernames, name)
	if errors.Is(err, ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("identity: reading username %s: %w", name, err)
	}
	return string(b), nil
}

// putAccount stores rec (acknowledged), updates the in-memory view and
// returns the record now stored: the replicated store joins rec with
// concurrent edits of other nodes it already holds.
func (s *Service) putAccount(ctx context.Context, rec accountRecord) (accountRecord, error) {
	b, err := encodeAccount(rec)
	if err != nil {
		return rec, err
	}
	if err := s.store.Put(ctx, bucketAccounts, rec.ID, b); err != nil {
		return rec, fmt.Errorf("identity: storing account %s: %w", rec.ID, err)
	}
	if stored, err := s.loadAccount(rec.ID); err == nil {
		rec = stored
	} else {
		rec.derive()
	}
	s.applyAccount(rec.ID, &rec)
	return rec, nil
}

// claimUsername points the index entry name at id (first writer wins) and
// reads it back. ErrUsernameTaken if another account holds it.
func (s *Service) claimUsername(ctx context.Context, name, id string) error {
	owner, err := s.usernameOwner(name)
	if err != nil {
		return err
	}
	if owner == id {
		return nil
	}
	if owner != "" {
		return fmt.Errorf("identity: %q: %w", name, ErrUsernameTaken)
	}
	if err := s.store.Put(ctx, bucketUsernames, name, []byte(id)); err != nil {
		return fmt.Errorf("identity: storing username %s: %w", name, err)
	}
	if owner, err = s.usernameOwner(name); err != nil {
		return err
	}
	if owner != id {
		return fmt.Errorf("identity: %q: %w", name, ErrUsernameTaken)
	}
	return nil
}

// CreateAccount creates an account (admin path: groups come from a). The
// account record is written first, then the username index entry; if
// another account claimed the name meanwhile, the new record is deleted and
// ErrUsernameTaken returned, so no half-made account remains.
//
// If the store stored the records but could not get them acknowledged (an
// error that is not one of this package's), the account exists and will
// replicate: CreateAccount then returns it together with the error.
func (s *Service) CreateAccount(ctx context.Context, a NewAccount) (Account, error) {
	groups, err := normalizeGroups(a.Groups)
	if err != nil {
		return Account{}, err
	}
	return s.createAccount(ctx, newAccountID(), a, groups)
}

func (s *Service) createAccount(ctx context.Context, id string, a NewAccount, groups []string) (Account, error) {
	name, err := NormalizeUsername(a.Username)
	if err != nil {
		return Account{}, err
	}
	if err := checkPassword(a.Password); err != nil {
		return Account{}, err
	}
	display, email, err := checkProfile(a.Name, a.Email)
	if err != nil {
		return Account{}, err
	}
	if owner, err := s.usernameOwner(name); err != nil {
		return Account{}, err
	} else if owner != "" {
		return Account{}, fmt.Errorf("identity: %q: %w", name, ErrUsernameTaken)
	}
	phc, err := s.hasher.hash(ctx, a.Password) // outside writeMu: hashing is slow
	if err != nil {
		return Account{}, err
	}

	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if owner, err := s.usernameOwner(name); err != nil {
		return Account{}, err
	} else if owner != "" || s.nameCarried(name) {
		return Account{}, fmt.Errorf("identity: %q: %w", name, ErrUsernameTaken)
	}
	now := s.cfg.Now().UTC()
	rec := accountRecord{ID: id, Created: now, Updated: now}
	at := s.nextStamp(stamp{})
	rec.setUsername(name, false, at)
	rec.setProfile(display, email, at)
	rec.setPassword(phc, at)
	rec.setGroups(groups, at)
	stored, putErr := s.putAccount(ctx, rec)
	if putErr == nil {
		rec = stored
	}
	if putErr != nil {
		if _, err := s.store.Get(bucketAccounts, id); err != nil {
			return Account{}, putErr // nothing was written
		}
		// Stored here but not acknowledged (the store keeps replicating
		// it): complete the account with its index entry.
	}
	if err := s.claimUsername(ctx, name, id); err != nil {
		if !errors.Is(err, ErrUsernameTaken) {
			if owner, _ := s.usernameOwner(name); owner == id {
				// Claimed here, not acknowledged: the account is whole.
				return rec.account(), err
			}
		}
		s.undoAccount(ctx, id)
		return Account{}, err
	}
	if putErr != nil {
		return rec.account(), putErr
	}
	s.log.Info("account created", "account", id, "username", name)
	return rec.account(), nil
}

// nameCarried reports whether a known account record carries name (its
// index entry may not have arrived here yet).
func (s *Service) nameCarried(name string) bool {
	s.stateMu.RLock()
	defer s.stateMu.RUnlock()
	return len(s.byName[name]) > 0
}

// undoAccount deletes a record written by a failed creation.
func (s *Service) undoAccount(ctx context.Context, id string) {
	ctx, cancel := bgCtx(ctx)
	defer cancel()
	if err := s.store.Delete(ctx, bucketAccounts, id); err != nil {
		s.log.Warn("removing half-created account", "account", id, "error", err)
	}
	s.applyAccount(id, nil)
}

// Login checks a username and password. Unknown user, wrong password and
// disabled account all give ErrBadCredentials after the same work (one
// argon2 hash). Before any hashing, an IP address or username with too many
// recent failures gets a *ThrottledError (errors.Is ErrThrottled). A
// success resets the username's failure counter (not the IP's).
//
// Lockout is per IP address (IPv6 by /64) and per username, separately: an
// attacker who fails AccountFailures times for a username locks that
// username out from every IP, but only until the end of the current
// ThrottleWindow; failures while throttled are not counted, so the
// lockout cannot be extended beyond the window, only re-armed by a new
// burst after it.
func (s *Service) Login(ctx context.Context, username, password, ip string) (Account, error) {
	now := s.cfg.Now()
	// An impossible username is hashed and counted like an unknown one,
	// under the shared counter "acct:".
	name, valid := normalizeName(strings.TrimSpace(username), minUsernameLen, maxLookupLen)
	ipKey := "ip:" + ipThrottleKey(ip)
	acctKey := "acct:" + name
	if err := s.thr.check(now, ipKey, s.cfg.IPFailures, acctKey, s.cfg.AccountFailures); err != nil {
		return Account{}, err
	}

	var cands []accountRecord
	if valid && len(password) <= maxPasswordBytes {
		cands = s.loginCandidates(name)
	}
	var rec accountRecord
	ok := false
	if len(cands) == 0 {
		pw := password
		if len(pw) > maxPasswordBytes {
			pw = pw[:maxPasswordBytes]
		}
		if _, err := s.hasher.dummy(ctx, pw); err != nil {
			return Account{}, err
		}
	}
	for _, c := range cands {
		match, err := s.hasher.verify(ctx, password, c.PasswordHash)
		if err != nil && ctx.Err() != nil {
			return Account{}, err
		}
		if err != nil {
			s.log.Error("account has an unusable password hash", "account", c.ID, "error", err)
		}
		if match {
			rec, ok = c, !c.Disabled
			break
		}
	}
	if !ok {
		s.thr.fail(s.store, now, ipKey, acctKey)
		return Account{}, ErrBadCredentials
	}
	s.thr.reset(s.store, acctKey)

	// The account may have lost its name in a collision that has not been
	// resolved yet: resolve it now, so the member is told to pick a new name.
	if owner, err := s.usernameOwner(rec.Username); err == nil && owner != "" && owner != rec.ID {
		if r, err := s.resolveCollision(ctx, rec.ID); err == nil {
			rec = r
		} else {
			s.log.Warn("renaming account after username collision", "account", rec.ID, "error", err)
		}
	}
	return rec.account(), nil
}

// maxLoginCandidates bounds the accounts (so the hashes) one Login tries.
const maxLoginCandidates = 3

// loginCandidates returns the accounts a login as name may be for: the
// account the usernames index gives the name to, then any other account
// whose record still carries the name (it lost the name in a collision
// not yet resolved, or its index entry has not replicated here yet). Only
// a colliding name costs more than one hash.
func (s *Service) loginCandidates(name string) []accountRecord {
	var out []accountRecord
	owner, _ := s.usernameOwner(name)
	if owner != "" {
		if r, err := s.loadAccount(owner); err == nil && r.Username == name {
			out = append(out, r)
		}
	}
	s.stateMu.RLock()
	others := make([]string, 0, len(s.byName[name]))
	for id := range s.byName[name] {
		if id != owner {
			others = append(others, id)
		}
	}
	s.stateMu.RUnlock()
	slices.Sort(others)
	for _, id := range others {
		if len(out) >= maxLoginCandidates {
			break
		}
		if r, err := s.loadAccount(id); err == nil && r.Username == name {
			out = append(out, r)
		}
	}
	return out
}

// Account returns the account with id, or ErrNotFound.
func (s *Service) Account(id string) (Account, error) {
	rec, err := s.loadAccount(id)
	if err != nil {
		return Account{}, err
	}
	return rec.account(), nil
}

// AccountByUsername returns the account that holds username (case-
// insensitive), or ErrNotFound.
func (s *Service) AccountByUsername(username string) (Account, error) {
	name, ok := normalizeName(strings.TrimSpace(username), minUsernameLen, maxLookupLen)
	if !ok {
		return Account{}, fmt.Errorf("identity: username %q: %w", username, ErrNotFound)
	}
	id, err := s.usernameOwner(name)
	if err != nil {
		return Account{}, err
	}
	if id == "" {
		return Account{}, fmt.Errorf("identity: username %s: %w", name, ErrNotFound)
	}
	rec, err := s.loadAccount(id)
	if err != nil {
		return Account{}, err
	}
	if rec.Username != name {
		return Account{}, fmt.Errorf("identity: username %s: %w", name, ErrNotFound)
	}
	return rec.account(), nil
}

// Accounts returns every account, sorted by username.
func (s *Service) Accounts() ([]Account, error) {
	entries, err := s.store.List(bucketAccounts, "")
	if err != nil {
		return nil, fmt.Errorf("identity: listing accounts: %w", err)
	}
	out := make([]Account, 0, len(entries))
	for _, e := range entries {
		var rec accountRecord
		if err := decodeJSON("account "+e.Key, e.Value, &rec); err != nil {
			s.log.Warn("skipping bad account record", "account", e.Key, "error", err)
			continue
		}
		out = append(out, rec.account())
	}
	slices.SortFunc(out, func(a, b Account) int { return strings.Compare(a.Username, b.Username) })
	return out, nil
}

// updateAccount applies fn to the stored record under writeMu and stores
// the result. fn stamps the fields it changes with at, a stamp higher than
// every stamp in the record.
func (s *Service) updateAccount(ctx context.Context, id string, fn func(r *accountRecord, at stamp) error) (accountRecord, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	rec, err := s.loadAccount(id)
	if err != nil {
		return rec, err
	}
	if err := fn(&rec, s.nextStamp(rec.lastStamp())); err != nil {
		return rec, err
	}
	rec.Updated = s.cfg.Now().UTC()
	return s.putAccount(ctx, rec)
}

// UpdateProfile sets the display name and email address.
func (s *Service) UpdateProfile(ctx context.Context, id, name, email string) (Account, error) {
	name, email, err := checkProfile(name, email)
	if err != nil {
		return Account{}, err
	}
	rec, err := s.updateAccount(ctx, id, func(r *accountRecord, at stamp) error {
		r.setProfile(name, email, at)
		return nil
	})
	if err != nil {
		return Account{}, err
	}
	return rec.account(), nil
}

// ChangePassword sets a new password after checking the old one
// (ErrBadCredentials if it is wrong). Existing sessions stay valid.
func (s *Service) ChangePassword(ctx context.Context, id, oldPassword, newPassword string) error {
	if err := checkPassword(newPassword); err != nil {
		return err
	}
	rec, err := s.loadAccount(id)
	if err != nil {
		return err
	}
	if len(oldPassword) > maxPasswordBytes {
		return ErrBadCredentials
	}
	ok, err := s.hasher.verify(ctx, oldPassword, rec.PasswordHash)
	if err != nil && ctx.Err() != nil {
		return err
	}
	if !ok {
		return ErrBadCredentials
	}
	return s.SetPassword(ctx, id, newPassword)
}

// SetPassword sets a new password without checking the old one (admin reset).
func (s *Service) SetPassword(ctx context.Context, id, newPassword string) error {
	if err := checkPassword(newPassword); err != nil {
		return err
	}
	if _, err := s.loadAccount(id); err != nil {
		return err
	}
	phc, err := s.hasher.hash(ctx, newPassword)
	if err != nil {
		return err
	}
	_, err = s.updateAccount(ctx, id, func(r *accountRecord, at stamp) error {
		r.setPassword(phc, at)
		return nil
	})
	return err
}

// SetGroups replaces the account's groups. Tokens verified afterwards carry
// the new groups (Verify reports the account's current profile).
func (s *Service) SetGroups(ctx context.Context, id string, groups []string) error {
	g, err := normalizeGroups(groups)
	if err != nil {
		return err
	}
	_, err = s.updateAccount(ctx, id, func(r *accountRecord, at stamp) error {
		r.setGroups(g, at)
		return nil
	})
	return err
}

// SetDisabled disables or re-enables an account. Disabling also revokes all
// its sessions; re-enabling does not bring them back. A re-enable lifts
// the disables this node has seen; a disable made concurrently elsewhere
// stays in force (docs/INTERNALS.md, "Account merge").
func (s *Service) SetDisabled(ctx context.Context, id string, disabled bool) error {
	if _, err := s.updateAccount(ctx, id, func(r *accountRecord, at stamp) error {
		r.setDisabled(disabled, at)
		return nil
	}); err != nil {
		return err
	}
	if disabled {
		return s.RevokeAll(ctx, id)
	}
	return nil
}

// Rename gives the account a new username (ErrInvalidUsername,
// ErrUsernameTaken) and clears MustRename. The new name is claimed in the
// index first, then the account record is updated, then the old index entry
// is released.
func (s *Service) Rename(ctx context.Context, id, newUsername string) (Account, error) {
	name, err := NormalizeUsername(newUsername)
	if err != nil {
		return Account{}, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	rec, err := s.renameLocked(ctx, id, name, false)
	if err != nil {
		return Account{}, err
	}
	return rec.account(), nil
}

// renameLocked moves account id to name. writeMu must be held.
func (s *Service) renameLocked(ctx context.Context, id, name string, mustRename bool) (accountRecord, error) {
	rec, err := s.loadAccount(id)
	if err != nil {
		return rec, err
	}
	old := rec.Username
	if err := s.claimUsername(ctx, name, id); err != nil {
		return rec, err
	}
	rec.setUsername(name, mustRename, s.nextStamp(rec.lastStamp()))
	rec.Updated = s.cfg.Now().UTC()
	stored, err := s.putAccount(ctx, rec)
	if err != nil {
		if name != old {
			s.releaseUsername(ctx, name, id)
		}
		return rec, err
	}
	if name != old {
		s.releaseUsername(ctx, old, id)
	}
	return stored, nil
}

// releaseUsername deletes the index entry name if it points at id.
func (s *Service) releaseUsername(ctx context.Context, name, id string) {
	if owner, err := s.usernameOwner(name); err != nil || owner != id {
		return
	}
	ctx, cancel := bgCtx(ctx)
	defer cancel()
	if err := s.store.Delete(ctx, bucketUsernames, name); err != nil {
		s.log.Warn("releasing old username", "username", name, "error", err)
	}
}
