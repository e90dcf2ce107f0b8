//! A secondary index over a watch stream: which cached objects belong to which key (for
//! example, the CertificateRequests of one Device), so a reconcile looks up its own objects
//! instead of scanning the whole cache. Kept in step with the reflector by observing the same
//! watch events, including relists.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::{Arc, Mutex},
};

use kube::{
    Resource,
    runtime::{reflector::ObjectRef, watcher::Event},
};

type Keys<K> = Box<dyn Fn(&K) -> Vec<String> + Send + Sync>;

pub struct Index<K: Resource>
where
    K::DynamicType: Default + Eq + Hash + Clone,
{
    keys: Keys<K>,
    state: Mutex<State<K>>,
}

type ByKey<K> = HashMap<String, HashSet<ObjectRef<K>>>;
type KeysOf<K> = HashMap<ObjectRef<K>, Vec<String>>;

struct State<K: Resource>
where
    K::DynamicType: Eq + Hash,
{
    live: ByKey<K>,
    /// Keys each object was indexed under, to unindex it on change or deletion.
    of: KeysOf<K>,
    /// A relist in progress: the new view, swapped in when it completes.
    relist: Option<(ByKey<K>, KeysOf<K>)>,
}

impl<K> Index<K>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    pub fn new(keys: impl Fn(&K) -> Vec<String> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            keys: Box::new(keys),
            state: Mutex::new(State {
                live: HashMap::new(),
                of: HashMap::new(),
                relist: None,
            }),
        })
    }

    /// Feeds one watch event (call it for every event the reflector sees).
    pub fn observe(&self, event: &Event<K>) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        match event {
            Event::Init => s.relist = Some((HashMap::new(), HashMap::new())),
            Event::InitApply(obj) => {
                let keys = (self.keys)(obj);
                let r = ObjectRef::from_obj(obj);
                if let Some((live, of)) = s.relist.as_mut() {
                    insert(live, of, r, keys);
                }
            }
            Event::InitDone => {
                if let Some((live, of)) = s.relist.take() {
                    s.live = live;
                    s.of = of;
                }
            }
            Event::Apply(obj) => {
                let r = ObjectRef::from_obj(obj);
                let keys = (self.keys)(obj);
                let state = &mut *s;
                remove(&mut state.live, &mut state.of, &r);
                insert(&mut state.live, &mut state.of, r, keys);
            }
            Event::Delete(obj) => {
                let r = ObjectRef::from_obj(obj);
                let state = &mut *s;
                remove(&mut state.live, &mut state.of, &r);
            }
        }
    }

    /// The objects indexed under `key`.
    pub fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.live.get(key).map(|set| set.iter().cloned().collect()))
            .unwrap_or_default()
    }
}

fn insert<K: Resource>(
    live: &mut HashMap<String, HashSet<ObjectRef<K>>>,
    of: &mut HashMap<ObjectRef<K>, Vec<String>>,
    r: ObjectRef<K>,
    keys: Vec<String>,
) where
    K::DynamicType: Eq + Hash + Clone,
{
    if keys.is_empty() {
        return;
    }
    for k in &keys {
        live.entry(k.clone()).or_default().insert(r.clone());
    }
    of.insert(r, keys);
}

fn remove<K: Resource>(
    live: &mut HashMap<String, HashSet<ObjectRef<K>>>,
    of: &mut HashMap<ObjectRef<K>, Vec<String>>,
    r: &ObjectRef<K>,
) where
    K::DynamicType: Eq + Hash + Clone,
{
    for k in of.remove(r).unwrap_or_default() {
        if let Some(set) = live.get_mut(&k) {
            set.remove(r);
            if set.is_empty() {
                live.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str, owner: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"owner": owner}}
        }))
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<ConfigMap>>) -> Vec<String> {
        let mut v: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        v.sort();
        v
    }

    #[test]
    fn follows_applies_deletes_and_relists() {
        let index = Index::new(|c: &ConfigMap| {
            c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("owner").cloned())
                .into_iter()
                .collect()
        });
        index.observe(&Event::Init);
        index.observe(&Event::InitApply(cm("a", "dev-1")));
        assert!(
            index.get("dev-1").is_empty(),
            "not visible before the list completes"
        );
        index.observe(&Event::InitDone);
        assert_eq!(names(index.get("dev-1")), ["a"]);
        index.observe(&Event::Apply(cm("b", "dev-1")));
        index.observe(&Event::Apply(cm("c", "dev-2")));
        assert_eq!(names(index.get("dev-1")), ["a", "b"]);
        // Re-owned: moves to the new key.
        index.observe(&Event::Apply(cm("b", "dev-2")));
        assert_eq!(names(index.get("dev-1")), ["a"]);
        assert_eq!(names(index.get("dev-2")), ["b", "c"]);
        index.observe(&Event::Delete(cm("a", "dev-1")));
        assert!(index.get("dev-1").is_empty());
        // A relist replaces everything at once.
        index.observe(&Event::Init);
        index.observe(&Event::InitApply(cm("z", "dev-9")));
        assert_eq!(
            names(index.get("dev-2")),
            ["b", "c"],
            "old view serves until the relist ends"
        );
        index.observe(&Event::InitDone);
        assert!(index.get("dev-2").is_empty());
        assert_eq!(names(index.get("dev-9")), ["z"]);
    }
}
