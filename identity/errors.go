package identity

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors. Callers test them with errors.Is; the Service wraps them
// with context using %w.
var (
	// ErrNotFound: the record (account, session, key, store entry) does not exist.
	// Store implementations return it (or an error wrapping it) from Get.
	ErrNotFound = errors.New("identity: not found")
	// ErrBadCredentials: unknown user, wrong password or disabled account.
	// Login never says which.
	ErrBadCredentials = errors.New("identity: bad credentials")
	// ErrUsernameTaken: another account holds the username.
	ErrUsernameTaken = errors.New("identity: username taken")
	// ErrInvalidUsername: the username does not follow the rules (2-32 chars of
	// [a-z0-9._-], starting with a letter or digit).
	ErrInvalidUsername = errors.New("identity: invalid username")
	// ErrWeakPassword: the password is shorter than 8 characters or longer than
	// 1024 bytes.
	ErrWeakPassword = errors.New("identity: password must be 8 to 1024 bytes long")
	// ErrInvalidInvite: the invite is unknown, expired or already used.
	ErrInvalidInvite = errors.New("identity: invalid or expired invite")
	// ErrInvalidToken: the session token is malformed, not signed by a circle
	// key, or not issued by this circle.
	ErrInvalidToken = errors.New("identity: invalid token")
	// ErrExpired: the session token has expired.
	ErrExpired = errors.New("identity: token expired")
	// ErrRevoked: the session was revoked, the account logged out everywhere,
	// or the account is disabled.
	ErrRevoked = errors.New("identity: token revoked")
	// ErrThrottled: too many failed logins; see ThrottledError for when to
	// retry.
	ErrThrottled = errors.New("identity: too many failed attempts")
	// ErrInvalidInput: an argument is malformed (bad group name, email, TTL...).
	ErrInvalidInput = errors.New("identity: invalid input")
	// ErrDisabled: the account is disabled (returned by IssueSession; Login
	// reports disabled accounts as ErrBadCredentials).
	ErrDisabled = errors.New("identity: account disabled")
	// ErrNotStarted: the operation needs a signing key, but Start has not
	// completed (or Close was called).
	ErrNotStarted = errors.New("identity: service not started")
)

// ThrottledError is returned by Login when the IP address or the account has
// had too many failures in the current window. errors.Is(err, ErrThrottled)
// holds for it.
type ThrottledError struct {
	// RetryAfter is how long until the window that triggered the throttle
	// ends (rounded up to a whole second, at least one second).
	RetryAfter time.Duration
}

// Error implements error.
func (e *ThrottledError) Error() string {
	return fmt.Sprintf("identity: too many failed attempts, retry after %s", e.RetryAfter)
}

// Is reports whether target is ErrThrottled.
func (e *ThrottledError) Is(target error) bool { return target == ErrThrottled }
