package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/vim25/soap"
)

// Faults are injected per VM or per host (see docs/lab.md).
type Faults struct {
	QuiesceFail        bool `json:"quiesce_fail,omitempty"`        // VM: quiescing fails (ApplicationQuiesceFault)
	SnapshotFail       bool `json:"snapshot_fail,omitempty"`       // VM or host: CreateSnapshot_Task fails (SnapshotFault)
	SlowMs             int  `json:"slow_ms,omitempty"`             // VM or host: snapshot tasks run this long, asynchronously
	LeaveConsolidation bool `json:"leave_consolidation,omitempty"` // VM: removing a snapshot leaves consolidationNeeded
	RefuseSnapshots    bool `json:"refuse_snapshots,omitempty"`    // host: new snapshots fail (SnapshotDisabled)
	ToolsNotRunning    bool `json:"tools_not_running,omitempty"`   // VM: VMware Tools stop running
	CBTOmit            bool `json:"cbt_omit,omitempty"`            // VM: CBT leaves the next guest writes out
	UploadFail         bool `json:"upload_fail,omitempty"`         // host: a /folder PUT into a disk of its VMs fails (500)
	CorruptRestore     bool `json:"corrupt_restore,omitempty"`     // host: a writable hot-add's write-back flips a byte
}

// faultNames are the names a fault request may use: the json names of Faults.
func faultNames() []string {
	var out []string
	t := reflect.TypeOf(Faults{})
	for i := 0; i < t.NumField(); i++ {
		out = append(out, strings.Split(t.Field(i).Tag.Get("json"), ",")[0])
	}
	return out
}

// decodeFaults reads a fault request, refusing a name the lab does not know (a test
// that misspells a fault must not pass without it).
func decodeFaults(raw json.RawMessage) (Faults, error) {
	var f Faults
	var names map[string]json.RawMessage
	if err := json.Unmarshal(raw, &names); err != nil {
		return f, err
	}
	known := faultNames()
	for name := range names {
		if !contains(known, name) {
			return f, fmt.Errorf("unknown fault %q (the lab knows %s)", name, strings.Join(known, ", "))
		}
	}
	return f, json.Unmarshal(raw, &f)
}

// sessionGate drops sessions: every session cookie seen before a drop is refused
// afterwards, so clients get NotAuthenticated as after a vCenter restart and must
// log in again. It also guards the datastore's /folder access, which vCenter serves
// to a valid session only (vSphere Web Services SDK guide, "Datastore Access
// (/folder)"): a cookie that is unknown (never used on /sdk), revoked or expired
// gets 401. Sessions idle longer than a threshold can be expired on demand, as
// vCenter's session idle timeout (30 min by default, Broadcom KB 1031039) does.
type sessionGate struct {
	mu      sync.Mutex
	seen    map[string]time.Time // session cookie -> last use
	revoked map[string]bool
	// dropAfter > 0: after that many more /folder requests, every session is dropped
	// (a drop in the middle of a read, at a point a test can name).
	dropAfter int
	// flatless says a datastore keeps no flat file (vSAN, vVols): /folder answers
	// 404 for its *-flat.vmdk, so a reader by URL finds no raw disk there.
	flatless func(ds string) bool
}

func newSessionGate() *sessionGate {
	return &sessionGate{seen: map[string]time.Time{}, revoked: map[string]bool{}}
}

func (g *sessionGate) drop() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.dropLocked(0)
}

// dropLocked revokes every session idle for at least idle (0: every session).
func (g *sessionGate) dropLocked(idle time.Duration) int {
	n := 0
	now := time.Now()
	for id, last := range g.seen {
		if !g.revoked[id] && now.Sub(last) >= idle {
			g.revoked[id] = true
			n++
		}
	}
	return n
}

// expireIdle revokes the sessions not used for idle or longer.
func (g *sessionGate) expireIdle(idle time.Duration) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.dropLocked(idle)
}

// dropAfterFolderRequests arms a drop of every session after n more /folder requests.
func (g *sessionGate) dropAfterFolderRequests(n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropAfter = n
}

func (g *sessionGate) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		folder := strings.HasPrefix(r.URL.Path, "/folder/")
		c, err := r.Cookie(soap.SessionCookieName)
		if folder {
			g.mu.Lock()
			ok := err == nil && !g.revoked[c.Value]
			if ok {
				_, ok = g.seen[c.Value]
			}
			if ok {
				g.seen[c.Value] = time.Now()
			}
			if g.dropAfter > 0 {
				g.dropAfter--
				if g.dropAfter == 0 {
					g.dropLocked(0)
				}
			}
			g.mu.Unlock()
			if !ok {
				http.Error(w, "no valid session: log in first", http.StatusUnauthorized)
				return
			}
			if g.flatless != nil && strings.HasSuffix(r.URL.Path, "-flat.vmdk") && g.flatless(r.URL.Query().Get("dsName")) {
				http.Error(w, "no flat file on this datastore (vSAN/vVols objects)", http.StatusNotFound)
				return
			}
			next.ServeHTTP(w, r)
			return
		}
		if err == nil {
			g.mu.Lock()
			revoked := g.revoked[c.Value]
			if !revoked {
				g.seen[c.Value] = time.Now()
			}
			g.mu.Unlock()
			if revoked {
				var kept []*http.Cookie
				for _, x := range r.Cookies() {
					if x.Name != soap.SessionCookieName {
						kept = append(kept, x)
					}
				}
				r.Header.Del("Cookie")
				for _, x := range kept {
					r.AddCookie(x)
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}

// fetchUnset answers pyVmomi's Fetch of an unset property (vm.snapshot without
// snapshots, for example) with an empty result, as vSphere does; the stock
// simulator panics there.
func fetchUnset(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body []byte
		if r.Body != nil {
			body, _ = io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		defer func() {
			if p := recover(); p != nil {
				if !bytes.Contains(body, []byte("<Fetch")) {
					panic(p)
				}
				log.Printf("lab: Fetch of an unset property answered empty")
				w.Header().Set("Content-Type", "text/xml; charset=utf-8")
				w.WriteHeader(http.StatusOK)
				_, _ = io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?>`+
					`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" `+
					`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
					`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
					`<soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body></soapenv:Envelope>`)
			}
		}()
		next.ServeHTTP(w, r)
	})
}
