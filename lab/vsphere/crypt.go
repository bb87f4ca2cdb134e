package main

import (
	"crypto/sha256"
	"encoding/binary"

	"github.com/vmware/govmomi/vim25/types"
)

// cryptoKey is the lab's stand-in for a VM encryption key (vSphere VM Encryption, a
// key from a key provider). A disk encrypted with it holds ciphertext in its files:
// every byte XORed with a key stream that depends on the key and the byte's offset on
// the disk, so reading a flat file (the `direct` transport, or HTTP /folder) gives
// visibly wrong bytes, while the lab's own reads (guest, hot-add to an agent that can
// decrypt, disk-image) give the plaintext. Holes stay holes: nothing was written there.
type cryptoKey struct {
	keyID    string
	provider string
	seed     uint64
}

// labKeyProvider is the key provider (KMS cluster) id of every lab key.
const labKeyProvider = "lab-kms"

func newCryptoKey(name string) *cryptoKey {
	sum := sha256.Sum256([]byte("vmbackup-lab-key:" + name))
	id := newUUID()
	return &cryptoKey{keyID: id, provider: labKeyProvider, seed: binary.LittleEndian.Uint64(sum[:8])}
}

func (k *cryptoKey) id() *types.CryptoKeyId {
	if k == nil {
		return nil
	}
	return &types.CryptoKeyId{KeyId: k.keyID, ProviderId: &types.KeyProviderId{Id: k.provider}}
}

// apply XORs buf, which sits at disk offset off, with the key stream (it both
// encrypts and decrypts). A nil key leaves buf alone.
func (k *cryptoKey) apply(buf []byte, off int64) {
	if k == nil {
		return
	}
	var word [8]byte
	for i := 0; i < len(buf); {
		pos := off + int64(i)
		w := pos &^ 7
		binary.LittleEndian.PutUint64(word[:], splitmix64(k.seed^uint64(w/8)))
		for j := pos - w; j < 8 && i < len(buf); j++ {
			buf[i] ^= word[j]
			i++
		}
	}
}

// canDecrypt tells whether a disk encrypted with key can be attached to agent vm: as in
// vSphere, an encrypted disk can belong only to an encrypted VM (whose host then holds
// the keys of the provider), so a backup proxy hot-adds encrypted disks only when it is
// itself encrypted with a key of the same provider.
func (vm *LabVM) canDecrypt(key *cryptoKey) bool {
	return key == nil || (vm.crypt != nil && vm.crypt.provider == key.provider)
}
