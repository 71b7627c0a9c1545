package identity

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// Username collisions.
//
// Two nodes cut off from each other can each give the same username to a
// different account. When they heal, the replicated usernames index (first
// writer wins) keeps the earlier claim; the other account still has a
// record carrying the name. Whichever node notices (a watch event on the
// accounts or usernames bucket, the scan at Start, or a Login by the old
// name with the loser's password) renames the loser to "<name>-<first 6 hex of its id>" (more hex if that is taken too)
// with MustRename set. The name is derived from the id, so nodes that do
// this concurrently write the same result. Nothing is deleted; the member
// logs in with the new name and picks another one with Rename.

// applyAccount updates the in-memory view of account id (rec nil: deleted)
// and drops cached tokens of the account, so Verify sees the change.
func (s *Service) applyAccount(id string, rec *accountRecord) {
	s.stateMu.Lock()
	old, hadOld := s.accounts[id]
	if hadOld {
		if ids := s.byName[old.username]; ids != nil {
			delete(ids, id)
			if len(ids) == 0 {
				delete(s.byName, old.username)
			}
		}
	}
	if rec == nil {
		delete(s.accounts, id)
	} else {
		s.accounts[id] = acctView{
			username: rec.Username, name: rec.Name, email: rec.Email,
			groups: slices.Clip(slices.Clone(rec.Groups)), disabled: rec.Disabled,
			// A generation never goes back, also when a concurrent whole-record
			// write that had not seen the increment wins.
			sessionGen: max(rec.SessionGen, old.sessionGen),
		}
		if s.byName[rec.Username] == nil {
			s.byName[rec.Username] = make(map[string]bool)
		}
		s.byName[rec.Username][id] = true
	}
	s.stateMu.Unlock()
	s.cache.purge(func(c *Claims) bool { return c.Subject == id })
}

// loadAccounts reads every account into the in-memory view and queues
// collision checks for accounts whose name is indexed to another account.
func (s *Service) loadAccounts() error {
	entries, err := s.store.List(bucketAccounts, "")
	if err != nil {
		return fmt.Errorf("listing accounts: %w", err)
	}
	for _, e := range entries {
		var rec accountRecord
		if err := decodeJSON("account "+e.Key, e.Value, &rec); err != nil || rec.ID != e.Key {
			s.log.Warn("skipping bad account record", "account", e.Key, "error", err)
			continue
		}
		s.applyAccount(rec.ID, &rec)
		s.checkCollision(rec.ID, &rec)
	}
	return nil
}

// onAccountEvent is the accounts bucket watch callback.
func (s *Service) onAccountEvent(id string, value []byte, deleted bool) {
	if deleted {
		s.applyAccount(id, nil)
		return
	}
	var rec accountRecord
	if err := decodeJSON("account "+id, value, &rec); err != nil || rec.ID != id {
		s.log.Warn("ignoring bad account record", "account", id, "error", err)
		return
	}
	s.applyAccount(id, &rec)
	s.checkCollision(id, &rec)
}

// onUsernameEvent is the usernames bucket watch callback: every other
// account carrying the name has lost it.
func (s *Service) onUsernameEvent(name string, value []byte, deleted bool) {
	if deleted {
		return
	}
	owner := string(value)
	s.stateMu.RLock()
	var losers []string
	for id := range s.byName[name] {
		if id != owner {
			losers = append(losers, id)
		}
	}
	s.stateMu.RUnlock()
	for _, id := range losers {
		s.queueRename(id)
	}
}

// checkCollision queues account id for renaming if the index gives its
// username to another account, unless id looks like the rightful owner
// whose own index entry has not arrived yet: the index keeps the earliest
// claim, and a claim is made right after the account is created, so an
// account created before the current owner will most likely take the index
// over (a usernames watch event then renames the other one). Such an
// account, if it does lose after all, is renamed when it next logs in.
func (s *Service) checkCollision(id string, rec *accountRecord) {
	owner, err := s.usernameOwner(rec.Username)
	if err != nil || owner == "" || owner == id {
		return
	}
	if o, err := s.loadAccount(owner); err == nil && o.Username == rec.Username &&
		(rec.Created.Before(o.Created) || (rec.Created.Equal(o.Created) && id < owner)) {
		return
	}
	s.queueRename(id)
}

func (s *Service) queueRename(id string) {
	s.renameMu.Lock()
	s.renameQ[id] = true
	s.renameMu.Unlock()
	select {
	case s.renameSig <- struct{}{}:
	default:
	}
}

// renameWorker resolves queued collisions off the watch callbacks.
func (s *Service) renameWorker(stop chan struct{}) {
	defer s.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-stop
		cancel()
	}()
	for {
		select {
		case <-stop:
			return
		case <-s.renameSig:
		}
		s.renameMu.Lock()
		ids := make([]string, 0, len(s.renameQ))
		for id := range s.renameQ {
			ids = append(ids, id)
		}
		clear(s.renameQ)
		s.renameMu.Unlock()
		slices.Sort(ids)
		for _, id := range ids {
			if _, err := s.resolveCollision(ctx, id); err != nil && !errors.Is(err, ErrNotFound) {
				s.log.Warn("renaming account after username collision", "account", id, "error", err)
			}
		}
	}
}

// resolveCollision renames account id if its username is indexed to another
// account, and returns the (possibly renamed) record.
func (s *Service) resolveCollision(ctx context.Context, id string) (accountRecord, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	rec, err := s.loadAccount(id)
	if err != nil {
		return rec, err
	}
	owner, err := s.usernameOwner(rec.Username)
	if err != nil {
		return rec, err
	}
	if owner == "" || owner == id {
		return rec, nil
	}
	base := rec.Username
	for n := 6; n <= len(id); n += 2 {
		r, err := s.renameLocked(ctx, id, base+"-"+id[:n], true)
		if errors.Is(err, ErrUsernameTaken) {
			continue
		}
		if err != nil {
			return rec, err
		}
		s.log.Warn("username collision: account renamed", "account", id, "old_username", base,
			"new_username", r.Username, "winner", owner)
		return r, nil
	}
	return rec, fmt.Errorf("identity: no free name for %s after collision: %w", base, ErrUsernameTaken)
}
