package identity_test

import (
	"context"
	"crypto/rand"
	"fmt"

	"github.com/homecircle/circle/identity"
)

func Example() {
	ctx := context.Background()
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)

	cfg := identity.DefaultConfig()
	cfg.Domain = "ourcircle.net"
	cfg.Secret = secret
	svc, err := identity.New(identity.NewMemStore(), cfg)
	if err != nil {
		panic(err)
	}
	if err := svc.Start(ctx); err != nil { // makes the first signing key
		panic(err)
	}
	defer svc.Close()

	invite, _ := svc.CreateInvite(ctx, []string{"family"}, 0, "admin")
	if _, err := svc.Register(ctx, invite, identity.NewAccount{Username: "Alice", Password: "correct horse"}); err != nil {
		panic(err)
	}
	acct, err := svc.Login(ctx, "alice", "correct horse", "192.0.2.1")
	if err != nil {
		panic(err)
	}
	token, _, _ := svc.IssueSession(ctx, acct, "example", "192.0.2.1")
	claims, err := svc.Verify(token) // what the gate does on every request
	fmt.Println(claims.Username, claims.Groups, err)
	fmt.Println(identity.Policy{Groups: []string{"family"}}.Allows(claims))
	// Output:
	// alice [family] <nil>
	// true
}
