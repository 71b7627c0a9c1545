package relay

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// TURN credentials follow the "REST API" scheme of
// draft-uberti-behave-turn-rest: the username is "<expiry-unix>:<node>"
// and the password is base64(HMAC-SHA256(K, username)), where
// K = HKDF-SHA256(circle secret, info "circle turn v1"). Any node holding
// the secret can mint credentials for itself; a TURN server holding the
// secret checks them without any shared state. Credentials stop working at
// the expiry, including for refreshes of an allocation made with them (see
// Allocation).

// turnKeyInfo is the HKDF label of the TURN credential key.
const turnKeyInfo = "circle turn v1"

// DefaultCredentialTTL is how long credentials minted by Allocate last.
const DefaultCredentialTTL = 24 * time.Hour

// turnKey derives the TURN credential key from the circle secret.
func turnKey(secret []byte) ([]byte, error) {
	if len(secret) < 16 {
		return nil, fmt.Errorf("%w: secret must be at least 16 bytes", ErrInvalid)
	}
	return hkdf.Key(sha256.New, secret, nil, turnKeyInfo, 32)
}

// Credentials returns TURN long-term credentials for node, valid until
// expiry (second resolution).
func Credentials(secret []byte, node string, expiry time.Time) (username, password string, err error) {
	if node == "" || strings.ContainsAny(node, "\x00") {
		return "", "", fmt.Errorf("%w: credentials: bad node name %q", ErrInvalid, node)
	}
	key, err := turnKey(secret)
	if err != nil {
		return "", "", err
	}
	username = strconv.FormatInt(expiry.Unix(), 10) + ":" + node
	return username, turnPassword(key, username), nil
}

// turnPassword is base64(HMAC-SHA256(key, username)).
func turnPassword(key []byte, username string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(username))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// checkUsername parses a credential username and reports whether it has
// not expired at now. It returns the node part.
func checkUsername(username string, now time.Time) (node string, err error) {
	exp, node, ok := strings.Cut(username, ":")
	if !ok || node == "" {
		return "", fmt.Errorf("%w: malformed username", ErrAuth)
	}
	sec, err := strconv.ParseInt(exp, 10, 64)
	if err != nil {
		return "", fmt.Errorf("%w: malformed expiry", ErrAuth)
	}
	if !now.Before(time.Unix(sec, 0)) {
		return "", fmt.Errorf("%w: credentials expired", ErrAuth)
	}
	return node, nil
}
