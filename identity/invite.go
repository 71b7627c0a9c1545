package identity

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Invite is what an invite token grants.
type Invite struct {
	Groups    []string  // the groups the new account gets
	Expires   time.Time // the token is invalid from this moment
	CreatedBy string    // free text (an account id or "admin"), for the record
}

// DefaultInviteTTL is the invite lifetime when CreateInvite gets ttl 0.
const DefaultInviteTTL = 72 * time.Hour

// inviteRecordVersion is the format version of invites bucket values.
const inviteRecordVersion = 1

// inviteRecord is the value stored under invites/<hex sha256(token)>, as
// JSON. The token itself is never stored. Used invites are kept (marked)
// until some time after they expire.
type inviteRecord struct {
	V         int       `json:"v"`
	Groups    []string  `json:"groups,omitempty"`
	Expires   time.Time `json:"expires"`
	CreatedBy string    `json:"created_by,omitempty"`
	Created   time.Time `json:"created"`
	Used      bool      `json:"used,omitempty"`
	UsedBy    string    `json:"used_by,omitempty"`
	UsedAt    time.Time `json:"used_at,omitzero"`
	// Uses are the registrations made with the invite, on any node; Used,
	// UsedBy and UsedAt are derived from them (the earliest use not
	// released) and stored for readers that do not know uses (merge.go).
	Uses []inviteUse `json:"uses,omitempty"`
}

// inviteTokenLen is the length of an invite token: 32 bytes, unpadded
// base64url.
var inviteTokenLen = base64.RawURLEncoding.EncodedLen(32)

// inviteKey returns the store key of token, or ok=false if it cannot be a
// token.
func inviteKey(token string) (string, bool) {
	if len(token) != inviteTokenLen {
		return "", false
	}
	if _, err := base64.RawURLEncoding.DecodeString(token); err != nil {
		return "", false
	}
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:]), true
}

// CreateInvite stores an invite granting groups, valid for ttl (0 means
// DefaultInviteTTL), and returns its token: 32 random bytes, unpadded
// base64url. Only the token's SHA-256 is stored.
func (s *Service) CreateInvite(ctx context.Context, groups []string, ttl time.Duration, createdBy string) (token string, err error) {
	if ttl < 0 {
		return "", fmt.Errorf("identity: negative invite ttl: %w", ErrInvalidInput)
	}
	if ttl == 0 {
		ttl = DefaultInviteTTL
	}
	g, err := normalizeGroups(groups)
	if err != nil {
		return "", err
	}
	now := s.cfg.Now().UTC()
	token = base64.RawURLEncoding.EncodeToString(randomBytes(32))
	key, _ := inviteKey(token)
	b, err := encodeInvite(inviteRecord{
		Groups: g, Expires: now.Add(ttl), CreatedBy: truncateUTF8(createdBy, 128), Created: now,
	})
	if err != nil {
		return "", err
	}
	if err := s.store.Put(ctx, bucketInvites, key, b); err != nil {
		return "", fmt.Errorf("identity: storing invite: %w", err)
	}
	return token, nil
}

// loadInvite returns the record of a valid (known, unexpired, unused)
// invite.
func (s *Service) loadInvite(token string) (string, inviteRecord, error) {
	var rec inviteRecord
	key, ok := inviteKey(token)
	if !ok {
		return "", rec, ErrInvalidInvite
	}
	b, err := s.store.Get(bucketInvites, key)
	if errors.Is(err, ErrNotFound) {
		return "", rec, ErrInvalidInvite
	}
	if err != nil {
		return "", rec, fmt.Errorf("identity: reading invite: %w", err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return "", rec, ErrInvalidInvite
	}
	rec.deriveUse()
	if rec.Used || !s.cfg.Now().Before(rec.Expires) {
		return "", rec, ErrInvalidInvite
	}
	return key, rec, nil
}

// CheckInvite returns the invite of a token that can still be used, or
// ErrInvalidInvite (unknown, expired or used).
func (s *Service) CheckInvite(token string) (Invite, error) {
	_, rec, err := s.loadInvite(token)
	if err != nil {
		return Invite{}, err
	}
	return Invite{Groups: slices.Clone(rec.Groups), Expires: rec.Expires, CreatedBy: rec.CreatedBy}, nil
}

// Register creates an account with an invite, which is used up. The
// account's groups are the invite's (a.Groups is ignored). The invite is
// marked used before the account is written and restored if creating the
// account fails, so a failed registration (e.g. ErrUsernameTaken) can be
// retried (as CreateAccount, an account that was stored but not
// acknowledged is returned with the error, and the invite stays used). On
// one node an invite cannot be used twice; two nodes cut off from each
// other could each accept it once: after the heal the invite records both
// uses, the earliest owns it, and both accounts stay (docs/INTERNALS.md,
// "Account merge").
func (s *Service) Register(ctx context.Context, token string, a NewAccount) (Account, error) {
	key, rec, err := s.loadInvite(token)
	if err != nil {
		return Account{}, err
	}
	// Cheap checks first, so common mistakes leave the invite alone.
	name, err := NormalizeUsername(a.Username)
	if err != nil {
		return Account{}, err
	}
	if err := checkPassword(a.Password); err != nil {
		return Account{}, err
	}
	if _, _, err := checkProfile(a.Name, a.Email); err != nil {
		return Account{}, err
	}
	if owner, err := s.usernameOwner(name); err != nil {
		return Account{}, err
	} else if owner != "" {
		return Account{}, fmt.Errorf("identity: %q: %w", name, ErrUsernameTaken)
	}

	s.inviteMu.Lock()
	if s.invitesBusy[key] {
		s.inviteMu.Unlock()
		return Account{}, ErrInvalidInvite
	}
	s.invitesBusy[key] = true
	s.inviteMu.Unlock()
	defer func() {
		s.inviteMu.Lock()
		delete(s.invitesBusy, key)
		s.inviteMu.Unlock()
	}()
	// Re-check under the busy mark: another registration may just have
	// finished with it.
	if key, rec, err = s.loadInvite(token); err != nil {
		return Account{}, err
	}

	id := newAccountID()
	use := inviteUse{stamp: s.nextStamp(rec.lastUseStamp()), Account: id, At: s.cfg.Now().UTC()}
	used := rec
	used.Uses = append(slices.Clone(rec.Uses), use)
	b, err := encodeInvite(used)
	if err != nil {
		return Account{}, err
	}
	if err := s.store.Put(ctx, bucketInvites, key, b); err != nil {
		return Account{}, fmt.Errorf("identity: marking invite used: %w", err)
	}
	acct, err := s.createAccount(ctx, id, a, rec.Groups)
	if err != nil && acct.ID != "" {
		return acct, err // created, not acknowledged: the invite stays used
	}
	if err != nil {
		// Give the invite back by releasing this use (uses only grow: the
		// replicated store would join the old record with the used one).
		use.Released = true
		back := rec
		back.Uses = append(slices.Clone(rec.Uses), use)
		orig, _ := encodeInvite(back)
		rctx, cancel := bgCtx(ctx)
		defer cancel()
		if rerr := s.store.Put(rctx, bucketInvites, key, orig); rerr != nil {
			s.log.Warn("restoring invite after failed registration", "error", rerr)
		}
		return Account{}, err
	}
	s.log.Info("account registered with invite", "account", id, "username", acct.Username)
	return acct, nil
}

// pruneInvites deletes invites that expired more than a week ago.
func (s *Service) pruneInvites(ctx context.Context, now time.Time) {
	entries, err := s.store.List(bucketInvites, "")
	if err != nil {
		return
	}
	n := 0
	for _, e := range entries {
		var rec inviteRecord
		if err := json.Unmarshal(e.Value, &rec); err != nil {
			continue
		}
		if now.After(rec.Expires.Add(7 * 24 * time.Hour)) {
			if n++; n > maxPrunePerRun || ctx.Err() != nil {
				return
			}
			if err := s.store.Delete(ctx, bucketInvites, e.Key); err != nil {
				s.log.Warn("pruning invite", "error", err)
			}
		}
	}
}
