// Command vmbackup-labsim runs the lab's simulated vSphere: govmomi's vCenter/ESXi
// simulator, extended with disk contents, delta disks, CBT, consolidation, hot-add,
// linked clones, fault injection and counters. See docs/lab.md.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
)

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func main() {
	state := flag.String("state", "", "state directory (datastores, CA, lab.json)")
	topoPath := flag.String("topology", "", "topology JSON file (default: built-in)")
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0: any free port)")
	flag.Parse()
	if *state == "" {
		fmt.Fprintln(os.Stderr, "vmbackup-labsim: --state is required")
		os.Exit(2)
	}
	if err := run(*state, *topoPath, *port); err != nil {
		fmt.Fprintf(os.Stderr, "vmbackup-labsim: %v\n", err)
		os.Exit(1)
	}
}

func run(stateArg, topoPath string, port int) error {
	state, err := filepath.Abs(stateArg)
	if err != nil {
		return err
	}
	topo, err := loadTopology(topoPath)
	if err != nil {
		return err
	}
	for _, d := range []string{"datastores", "agents"} {
		_ = os.RemoveAll(filepath.Join(state, d))
	}
	if err := os.MkdirAll(state, 0755); err != nil {
		return err
	}
	tlsNames := topo.TLSNames
	if len(tlsNames) == 0 {
		tlsNames = defaultTLSNames
	}
	tlsConf, caFile, err := makeTLS(state, tlsNames)
	if err != nil {
		return fmt.Errorf("making certificates: %v", err)
	}
	var model *simulator.Model
	if topo.Mode == "esxi" {
		model = simulator.ESX()
	} else {
		model = simulator.VPX()
		model.Datacenter, model.Host, model.Cluster, model.ClusterHost, model.Portgroup = 0, 0, 0, 0, 0
	}
	model.Datastore, model.Machine, model.Autostart = 0, 0, false
	if err := model.Create(); err != nil {
		return err
	}
	lab := newLab(state, topo)
	password := os.Getenv("VMBACKUP_LAB_PASSWORD")
	if password == "" {
		password = randomHex(12)
	}
	token := randomHex(16)
	model.Service.TLS = tlsConf
	model.Service.Listen = &url.URL{Host: fmt.Sprintf("127.0.0.1:%d", port), User: url.UserPassword(topo.User, password)}
	model.Service.HandleFunc("/lab/", lab.controlHandler(token))
	srv := model.Service.NewServer()
	srv.Config.Handler = lab.counters.countRequests(lab.sessions.wrap(lab.folderPut(fetchUnset(srv.Config.Handler))))
	defer srv.Close()

	ctx := context.Background()
	u := *srv.URL
	sc := soap.NewClient(&u, false)
	if err := sc.SetRootCAs(caFile); err != nil {
		return err
	}
	if !contains(tlsNames, "127.0.0.1") {
		// The certificate does not name the address: verify it by a name it carries.
		sc.DefaultTransport().TLSClientConfig.ServerName = tlsNames[0]
	}
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return fmt.Errorf("connecting to the simulator: %v", err)
	}
	sm := session.NewManager(vc)
	if err := sm.Login(ctx, u.User); err != nil {
		return fmt.Errorf("logging in to the simulator: %v", err)
	}
	if err := lab.build(ctx, vc); err != nil {
		return fmt.Errorf("building the topology: %v", err)
	}
	_ = sm.Logout(ctx)

	base := url.URL{Scheme: "https", Host: srv.URL.Host}
	info := map[string]interface{}{
		"pid":     os.Getpid(),
		"mode":    topo.Mode,
		"vsphere": map[string]interface{}{"url": base.String() + "/sdk", "host": srv.URL.Host, "user": topo.User, "password": password, "ca_file": caFile, "tls_names": tlsNames},
		"control": map[string]string{"url": base.String() + "/lab/", "token": token},
		"agents":  lab.agents, "hosts": topo.hosts(), "datacenter": topo.Datacenter,
		"datastores": lab.dsDirs, "topology": topoPath, "state": state,
	}
	data, _ := json.MarshalIndent(info, "", "  ")
	tmp := filepath.Join(state, "lab.json.tmp")
	if err := os.WriteFile(tmp, data, 0600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(state, "lab.json")); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "vmbackup-labsim: serving %s/sdk\n", base.String())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	_ = os.Remove(filepath.Join(state, "lab.json"))
	return nil
}
