package relay

import "errors"

// Sentinel errors. Errors returned by this package wrap one of these where
// the cause is one of them, so callers test with errors.Is.
var (
	// ErrInvalid reports a bad argument or configuration.
	ErrInvalid = errors.New("relay: invalid")
	// ErrClosed reports use of a closed Server, Mesh, Allocation or Transport.
	ErrClosed = errors.New("relay: closed")
	// ErrAuth reports credentials or a peer that do not prove knowledge of
	// the circle secret, or a peer whose name is not the expected one.
	ErrAuth = errors.New("relay: authentication failed")
	// ErrNoPeer reports that no connection to the named peer exists and
	// none could be made.
	ErrNoPeer = errors.New("relay: no connection to peer")
	// ErrNoService reports a stream for a service nobody listens on.
	ErrNoService = errors.New("relay: no such service")
)
