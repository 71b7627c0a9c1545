package identity

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// Password rules.
const (
	minPasswordChars = 8
	maxPasswordBytes = 1024
	saltLen          = 16
	hashLen          = 32
)

// Bounds on argon2 parameters read from stored PHC strings, so a corrupt
// record cannot make a login allocate gigabytes.
const (
	maxStoredMemory  = 1 << 20 // KiB (1 GiB)
	maxStoredTime    = 64
	maxStoredThreads = 64
)

// hasher computes argon2id hashes with at most cap(sem) in flight.
type hasher struct {
	memory  uint32
	time    uint32
	threads uint8
	sem     chan struct{}

	// Instrumentation, read by tests.
	computed    atomic.Int64 // hashes computed
	inFlight    atomic.Int64 // hashes running now
	maxInFlight atomic.Int64 // high-water mark of inFlight

	dummySalt []byte // salt for hashes against no account
	dummyHash []byte // random; nothing ever matches it

	testHook func() // if set, called while holding a hashing slot (tests)
}

func newHasher(cfg Config) *hasher {
	h := &hasher{
		memory:    cfg.Argon2Memory,
		time:      cfg.Argon2Time,
		threads:   cfg.Argon2Threads,
		sem:       make(chan struct{}, cfg.MaxConcurrentHashes),
		dummySalt: randomBytes(saltLen),
		dummyHash: randomBytes(hashLen),
	}
	return h
}

// checkPassword enforces the password policy for new passwords.
func checkPassword(pw string) error {
	if len(pw) > maxPasswordBytes || utf8.RuneCountInString(pw) < minPasswordChars {
		return ErrWeakPassword
	}
	return nil
}

// key runs argon2id under the concurrency bound.
func (h *hasher) key(ctx context.Context, pw string, salt []byte, t, m uint32, p uint8) ([]byte, error) {
	select {
	case h.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("identity: waiting to hash password: %w", ctx.Err())
	}
	n := h.inFlight.Add(1)
	for {
		old := h.maxInFlight.Load()
		if n <= old || h.maxInFlight.CompareAndSwap(old, n) {
			break
		}
	}
	if h.testHook != nil {
		h.testHook()
	}
	k := argon2.IDKey([]byte(pw), salt, t, m, p, hashLen)
	h.computed.Add(1)
	h.inFlight.Add(-1)
	<-h.sem
	return k, nil
}

// hash returns the PHC string of pw with the configured parameters:
// $argon2id$v=19$m=<KiB>,t=<passes>,p=<threads>$<salt>$<hash> (unpadded
// standard base64).
func (h *hasher) hash(ctx context.Context, pw string) (string, error) {
	salt := randomBytes(saltLen)
	k, err := h.key(ctx, pw, salt, h.time, h.memory, h.threads)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, h.memory, h.time, h.threads,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(k)), nil
}

// verify reports whether pw matches the PHC string phc. A malformed phc is an
// error; it still costs one hash (against the dummy) so that callers need no
// special timing care.
func (h *hasher) verify(ctx context.Context, pw, phc string) (bool, error) {
	p, err := parsePHC(phc)
	if err != nil {
		_, _ = h.dummy(ctx, pw)
		return false, err
	}
	k, err := h.key(ctx, pw, p.salt, p.time, p.memory, p.threads)
	if err != nil {
		return false, err
	}
	return subtle.ConstantTimeCompare(k, p.hash) == 1, nil
}

// dummy computes one hash with the configured parameters that can never
// match, for logins of unknown users (no timing oracle).
func (h *hasher) dummy(ctx context.Context, pw string) (bool, error) {
	k, err := h.key(ctx, pw, h.dummySalt, h.time, h.memory, h.threads)
	if err != nil {
		return false, err
	}
	_ = subtle.ConstantTimeCompare(k, h.dummyHash)
	return false, nil
}

type phcParams struct {
	memory, time uint32
	threads      uint8
	salt, hash   []byte
}

func parsePHC(s string) (phcParams, error) {
	var p phcParams
	parts := strings.Split(s, "$")
	// "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" {
		return p, fmt.Errorf("identity: malformed password hash: %w", ErrInvalidInput)
	}
	var v int
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || v != argon2.Version {
		return p, fmt.Errorf("identity: unsupported argon2 version %q: %w", parts[2], ErrInvalidInput)
	}
	var m, t, th uint32
	if n, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &th); err != nil || n != 3 {
		return p, fmt.Errorf("identity: malformed argon2 parameters %q: %w", parts[3], ErrInvalidInput)
	}
	if m == 0 || m > maxStoredMemory || t == 0 || t > maxStoredTime || th == 0 || th > maxStoredThreads || m < 8*th {
		return p, fmt.Errorf("identity: argon2 parameters out of range %q: %w", parts[3], ErrInvalidInput)
	}
	salt, err := base64.RawStdEncoding.DecodeString(parts[4])
	if err != nil || len(salt) < 8 {
		return p, fmt.Errorf("identity: malformed password salt: %w", ErrInvalidInput)
	}
	hash, err := base64.RawStdEncoding.DecodeString(parts[5])
	if err != nil || len(hash) < 16 {
		return p, fmt.Errorf("identity: malformed password hash value: %w", ErrInvalidInput)
	}
	p.memory, p.time, p.threads, p.salt, p.hash = m, t, uint8(th), salt, hash
	return p, nil
}

// randomBytes returns n bytes from crypto/rand (which never fails).
func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
