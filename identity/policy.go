package identity

import "strings"

// Policy says who may pass a gate. The zero Policy admits any signed-in
// member.
type Policy struct {
	Users  []string // usernames allowed (case-insensitive)
	Groups []string // groups allowed (case-insensitive)
}

// Allows reports whether c (verified claims) satisfies the policy: with no
// Users and no Groups, any member (non-empty Subject); otherwise c's
// username is in Users or one of its groups is in Groups. It does not
// allocate.
func (p Policy) Allows(c Claims) bool {
	if c.Subject == "" {
		return false
	}
	if len(p.Users) == 0 && len(p.Groups) == 0 {
		return true
	}
	if c.Username != "" {
		for _, u := range p.Users {
			if strings.EqualFold(u, c.Username) {
				return true
			}
		}
	}
	for _, g := range p.Groups {
		for _, cg := range c.Groups {
			if strings.EqualFold(g, cg) {
				return true
			}
		}
	}
	return false
}
