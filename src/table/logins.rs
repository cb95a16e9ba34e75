//! Submission logins: one per alias, the login name being the alias itself, the
//! password stored as an Argon2id hash (PHC string) in a tree of its own — or, for a
//! fleet, in the `logins` table of its PostgreSQL database (any node authenticates).
//!
//! Never stores or returns a password in clear, and never logs one. Hashing and
//! verification are CPU-heavy by design (tens of milliseconds, megabytes of memory):
//! callers on an async runtime run them on the blocking pool, with a bound on how many
//! run at once. Verification compares the hash outputs in constant time (the
//! `password-hash` crate's `Output` equality).

use super::pg::PgStore;
use super::{AliasName, TableError, key};
use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use serde::{Deserialize, Serialize};

/// Longest password accepted (bytes): the SASL PLAIN line must fit tenso's command
/// line with the longest alias.
pub const MAX_PASSWORD: usize = 128;
/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

/// What the tree holds per alias.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Login {
    /// `$argon2id$v=19$m=…,t=…,p=…$salt$hash`.
    hash: String,
    updated: i64,
}

/// Argon2id with the given cost (memory in KiB, iterations, lanes).
pub fn hasher(memory_kib: u32, iterations: u32, lanes: u32) -> Result<Argon2<'static>, String> {
    let params = Params::new(memory_kib, iterations, lanes, None)
        .map_err(|e| format!("argon2 parameters: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A new salted hash of `password` (PHC string).
pub fn hash_password(argon: &Argon2<'_>, password: &[u8]) -> Result<String, String> {
    argon
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `hash` (made with any Argon2 cost; the
/// cost is read from the string). A malformed hash matches nothing.
pub fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default().verify_password(password, &h).is_ok(),
        Err(_) => false,
    }
}

/// A stored hash must be an Argon2id PHC string (what `tenso user passwd` makes).
pub fn check_hash(hash: &str) -> Result<(), TableError> {
    let h = PasswordHash::new(hash)
        .map_err(|e| TableError::Invalid(format!("not a password hash: {e}")))?;
    if h.algorithm.as_str() != "argon2id" || h.hash.is_none() || h.salt.is_none() {
        return Err(TableError::Invalid(
            "the password hash must be a salted argon2id PHC string".into(),
        ));
    }
    Ok(())
}

/// Rules for a password an admin sets: printable, no spaces at either end (they get
/// lost in mail clients' forms), within [`MIN_PASSWORD`]..=[`MAX_PASSWORD`] bytes.
pub fn check_password(pw: &str) -> Result<(), String> {
    if pw.len() < MIN_PASSWORD || pw.len() > MAX_PASSWORD {
        return Err(format!(
            "a password must be {MIN_PASSWORD} to {MAX_PASSWORD} bytes long"
        ));
    }
    if pw.chars().any(char::is_control) || pw.trim() != pw {
        return Err(
            "a password must not hold control characters or start or end with a space".into(),
        );
    }
    Ok(())
}

/// A random password for `tenso user passwd` without input: 24 characters from an
/// alphabet without look-alikes (about 140 bits).
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The logins, where the table is.
#[derive(Clone)]
pub struct Logins {
    store: LoginStore,
}

#[derive(Clone)]
enum LoginStore {
    Sled {
        tree: sled::Tree,
        aliases: sled::Tree,
        db: sled::Db,
    },
    Pg(PgStore),
}

impl Logins {
    pub(super) fn open(db: &sled::Db, aliases: &sled::Tree) -> Result<Logins, TableError> {
        Ok(Logins {
            store: LoginStore::Sled {
                tree: db.open_tree("logins")?,
                aliases: aliases.clone(),
                db: db.clone(),
            },
        })
    }

    pub(super) fn shared(pg: PgStore) -> Logins {
        Logins {
            store: LoginStore::Pg(pg),
        }
    }

    /// The tree key of a login name; only an existing alias proper (not a
    /// catch-all, not a subaddress) can have a login.
    fn key_of(&self, alias: &str) -> Result<(AliasName, Vec<u8>), TableError> {
        let name = AliasName::parse(alias)?;
        if name.local.is_empty() {
            return Err(TableError::Invalid(format!(
                "{name}: a catch-all is no address and cannot log in"
            )));
        }
        let k = key(&name.domain, &name.local);
        Ok((name, k))
    }

    /// Sets (or replaces) the password hash of `alias`; flushed before it returns.
    pub fn set(&self, alias: &str, hash: &str) -> Result<(), TableError> {
        check_hash(hash)?;
        let (name, k) = self.key_of(alias)?;
        let login = Login {
            hash: hash.to_string(),
            updated: crate::time::unix_now(),
        };
        let value = serde_json::to_vec(&login).expect("login serializes");
        let exists = match &self.store {
            LoginStore::Sled { tree, aliases, db } => {
                if aliases.contains_key(&k)? {
                    tree.insert(k, value)?;
                    db.flush()?;
                    true
                } else {
                    false
                }
            }
            LoginStore::Pg(p) => p.login_set(&k, String::from_utf8(value).expect("JSON"))?,
        };
        if !exists {
            return Err(TableError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Removes the login of `alias`; true if there was one.
    pub fn remove(&self, alias: &str) -> Result<bool, TableError> {
        let (_, k) = self.key_of(alias)?;
        match &self.store {
            LoginStore::Sled { tree, db, .. } => {
                let had = tree.remove(k)?.is_some();
                db.flush()?;
                Ok(had)
            }
            LoginStore::Pg(p) => p.login_remove(&k),
        }
    }

    /// The stored hash of a login: `Ok(None)` when there is none (no such alias, no
    /// login, or a name that is no alias at all: the caller cannot tell them apart,
    /// nor can a client). `Err` when the store cannot answer (the database away, a
    /// storage error): a fault is a temporary failure, never "wrong password".
    pub fn hash_of(&self, login: &str) -> Result<Option<String>, TableError> {
        let Ok((_, k)) = self.key_of(login) else {
            return Ok(None);
        };
        let v = match &self.store {
            LoginStore::Sled { tree, aliases, .. } => {
                let Some(v) = tree.get(&k)? else {
                    return Ok(None);
                };
                if !aliases.contains_key(&k)? {
                    return Ok(None);
                }
                v.to_vec()
            }
            LoginStore::Pg(p) => match p.login_get(&k)? {
                Some(v) => v.into_bytes(),
                None => return Ok(None),
            },
        };
        Ok(serde_json::from_slice::<Login>(&v).ok().map(|l| l.hash))
    }

    pub fn has(&self, alias: &str) -> Result<bool, TableError> {
        Ok(self.hash_of(alias)?.is_some())
    }

    /// The login name in its stored form (lowercase, quoted when needed), for MAIL
    /// FROM comparisons and logs.
    pub fn canonical(alias: &str) -> Option<String> {
        AliasName::parse(alias)
            .ok()
            .filter(|n| !n.local.is_empty())
            .map(|n| n.to_string())
    }

    /// Every login as stored: alias key and its record (`tenso table copy`).
    pub(super) fn all(&self) -> Result<Vec<(Vec<u8>, String)>, TableError> {
        match &self.store {
            LoginStore::Sled { tree, .. } => {
                let mut out = Vec::new();
                for kv in tree.iter() {
                    let (k, v) = kv?;
                    out.push((k.to_vec(), String::from_utf8_lossy(&v).into_owned()));
                }
                Ok(out)
            }
            LoginStore::Pg(p) => p.login_all(),
        }
    }

    /// Writes a stored record as it is (`tenso table copy`); false when the alias
    /// is not in this table.
    pub(super) fn put_raw(&self, key: &[u8], record: &str) -> Result<bool, TableError> {
        match &self.store {
            LoginStore::Sled { tree, aliases, .. } => {
                if !aliases.contains_key(key)? {
                    return Ok(false);
                }
                tree.insert(key, record.as_bytes())?;
                Ok(true)
            }
            LoginStore::Pg(p) => p.login_set(key, record.to_string()),
        }
    }

    /// Drops the login of an alias being removed (key as in the aliases tree).
    pub(super) fn forget(&self, alias_key: &[u8]) -> Result<(), TableError> {
        match &self.store {
            LoginStore::Sled { tree, .. } => {
                tree.remove(alias_key)?;
            }
            LoginStore::Pg(p) => {
                p.login_remove(alias_key)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BouncePolicy;

    #[test]
    fn set_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::table::Table::open(&dir.path().join("t"), 1 << 20, Some('+'), 8).unwrap();
        t.add(
            "Alice@Alias.test",
            &["a@dest.test".into()],
            BouncePolicy::Pool,
        )
        .unwrap();
        t.add("@catch.test", &["c@dest.test".into()], BouncePolicy::Pool)
            .unwrap();
        let l = t.logins().unwrap();
        let argon = hasher(64, 1, 1).unwrap();
        let h = hash_password(&argon, b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(matches!(
            l.set("bob@alias.test", &h),
            Err(TableError::NotFound(_))
        ));
        assert!(
            l.set("@catch.test", &h).is_err(),
            "a catch-all cannot log in"
        );
        assert!(l.set("alice@alias.test", "plaintext").is_err());
        let bcrypt = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
        assert!(l.set("alice@alias.test", bcrypt).is_err());
        l.set("alice@alias.test", &h).unwrap();
        let stored = l
            .hash_of("ALICE@alias.TEST")
            .unwrap()
            .expect("login found by any case");
        assert!(verify(&stored, b"correct horse"));
        assert!(!verify(&stored, b"correct horsE"));
        assert!(!verify(&stored, b""));
        assert!(!verify("garbage", b"correct horse"));
        assert!(
            l.hash_of("alice+tag@alias.test").unwrap().is_none(),
            "no subaddress login"
        );
        assert_eq!(
            Logins::canonical("Alice@ALIAS.test").as_deref(),
            Some("alice@alias.test")
        );
        // Removing the alias removes its login.
        t.remove("alice@alias.test").unwrap();
        assert!(l.hash_of("alice@alias.test").unwrap().is_none());
        t.add(
            "alice@alias.test",
            &["a@dest.test".into()],
            BouncePolicy::Pool,
        )
        .unwrap();
        assert!(
            !l.has("alice@alias.test").unwrap(),
            "a new alias starts without a login"
        );
        l.set("alice@alias.test", &h).unwrap();
        assert!(l.remove("alice@alias.test").unwrap());
        assert!(!l.remove("alice@alias.test").unwrap());
    }

    #[test]
    fn password_rules() {
        assert!(check_password("short").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD + 1)).is_err());
        assert!(check_password(" leading space").is_err());
        assert!(check_password("tab\tinside").is_err());
        assert!(check_password("ünïcode pass phrase").is_ok());
        let g = generate_password();
        assert_eq!(g.len(), 24);
        check_password(&g).unwrap();
        assert_ne!(g, generate_password());
    }
}
