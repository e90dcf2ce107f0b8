//! IT/OT segmentation: the NetworkPolicies a DeviceGroup's zone gets, which device addresses are
//! isolated, and the audit of what the cluster's policies actually allow. Everything here is pure:
//! the operator feeds it from its watch caches and applies the result.
//!
//! For a zone whose workloads are selected by `spec.segmentation.workloadSelector`:
//!
//! - `fw-<group>-default-deny`: the workloads get no ingress and no egress except what the other
//!   policies allow;
//! - `fw-<group>-devices`: ingress from and egress to the device CIDRs on the declared ports,
//!   except the single addresses (`/32`, `/128`) of isolated devices;
//! - `fw-<group>-conduit-<name>`: one per conduit, to or from the pods labelled
//!   `fleetwarden.io/zone=<other zone>` in any namespace, on the conduit's ports;
//! - `fw-<group>-dns`: egress to cluster DNS, when `allowDNS` is set.
//!
//! A conduit is a two-sided agreement: the zone that opens connections declares it as `Egress`,
//! the zone that accepts them as `Ingress`. The audit reports a conduit only one side declares.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use crate::{
    conditions::{self, types},
    device::{Device, Lifecycle},
    group::{
        AuditFinding, ConduitDirection, DeviceGroup, DeviceGroupSpec, FindingKind, PortSpec,
        Segmentation, ZoneLevel,
    },
    selector,
};

/// Pod label that places a workload in a zone; conduits select their peers by it.
pub const ZONE_LABEL: &str = "fleetwarden.io/zone";
/// Label on every generated policy naming the DeviceGroup it belongs to.
pub const GROUP_LABEL: &str = "fleetwarden.io/device-group";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "fleetwarden";
/// Findings kept in status; the rest are counted in the AuditClean condition message.
pub const MAX_FINDINGS: usize = 100;

/// An IPv4 or IPv6 network, normalised to its network address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR: write it as address/prefix, e.g. 10.30.3.0/24 or fd00:30::/64")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if prefix > max_prefix(addr) {
            return Err(err());
        }
        Ok(Self {
            network: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

impl Cidr {
    /// The single-address network of `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            network: addr,
            prefix: max_prefix(addr),
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.network.is_ipv4() == addr.is_ipv4() && mask(addr, self.prefix) == self.network
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.network.is_ipv4() != other.network.is_ipv4() {
            return false;
        }
        let prefix = self.prefix.min(other.prefix);
        mask(self.network, prefix) == mask(other.network, prefix)
    }

    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(self.network)
    }
}

/// Why a device is cut off from its zone's workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsolationReason {
    Quarantined,
    Suspended,
    Retired,
    NonCompliant,
}

impl fmt::Display for IsolationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quarantined => "lifecycle Quarantined",
            Self::Suspended => "lifecycle Suspended",
            Self::Retired => "lifecycle Retired",
            Self::NonCompliant => "not compliant",
        })
    }
}

/// Whether the device must be isolated. Non-compliance counts once the device holds an identity
/// and has checked in (before that its posture is not known yet: isolating every new device
/// would make the except-list grow with the fleet, and every enrollment would isolate and
/// release it a moment later), and only when the group quarantines non-compliant devices.
pub fn isolation(device: &Device, group: &DeviceGroupSpec) -> Option<IsolationReason> {
    match device.spec.lifecycle {
        Lifecycle::Quarantined => return Some(IsolationReason::Quarantined),
        Lifecycle::Suspended => return Some(IsolationReason::Suspended),
        Lifecycle::Retired => return Some(IsolationReason::Retired),
        Lifecycle::Active => {}
    }
    let status = device.status.as_ref()?;
    status.identity.as_ref()?;
    status.last_seen.as_ref()?;
    let compliant = conditions::find(&status.conditions, types::COMPLIANT)?;
    // A verdict from before the device's first check-in (the gateway has just recorded it and
    // the operator not yet judged it) is no reason to cut the device off.
    (group.compliance.quarantine_non_compliant
        && compliant.status == conditions::FALSE
        && !crate::compliance::judged_before_report(&compliant.message))
    .then_some(IsolationReason::NonCompliant)
}

/// Every address the device is known by: its static `spec.addresses` and what it reported.
/// Unparseable entries are skipped (the webhook rejects them in the spec).
pub fn addresses(device: &Device) -> BTreeSet<IpAddr> {
    let reported = device
        .status
        .as_ref()
        .and_then(|s| s.reported.as_ref())
        .map(|r| r.addresses.as_slice())
        .unwrap_or_default();
    device
        .spec
        .addresses
        .iter()
        .chain(reported)
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// Deterministic policy name: `fw-<group>-<suffix>`, shortened with a hash when it would exceed
/// the 253 characters Kubernetes allows.
pub fn policy_name(group: &str, suffix: &str) -> String {
    let name = format!("fw-{group}-{suffix}");
    if name.len() <= 253 {
        return name;
    }
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keep = 253 - 1 - 10 - suffix.len() - 1 - 3;
    let head: String = group.chars().take(keep).collect();
    format!(
        "fw-{}-{}-{suffix}",
        head.trim_end_matches(['-', '.']),
        &digest[..10]
    )
}

/// What a policy name stands for; used in events and status.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub policies: Vec<NetworkPolicy>,
    /// Addresses removed from the allowed device networks.
    pub excepted: BTreeSet<IpAddr>,
}

/// The NetworkPolicies for the group's zone, with `isolated` addresses cut out of its device
/// networks. Empty when the group declares no segmentation. Unparseable CIDRs are skipped.
pub fn policies(group: &DeviceGroup, isolated: &BTreeSet<IpAddr>) -> Generated {
    let Some(seg) = group.spec.segmentation.as_ref() else {
        return Generated {
            policies: Vec::new(),
            excepted: BTreeSet::new(),
        };
    };
    let name = group.metadata.name.clone().unwrap_or_default();
    let meta = |suffix: &str| ObjectMeta {
        name: Some(policy_name(&name, suffix)),
        namespace: group.metadata.namespace.clone(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            (GROUP_LABEL.to_string(), name.clone()),
            (ZONE_LABEL.to_string(), seg.zone.clone()),
        ])),
        owner_references: Some(vec![OwnerReference {
            api_version: "fleetwarden.io/v1alpha1".into(),
            kind: "DeviceGroup".into(),
            name: name.clone(),
            uid: group.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..ObjectMeta::default()
    };
    let policy = |suffix: &str, types: &[&str], spec: NetworkPolicySpec| NetworkPolicy {
        metadata: meta(suffix),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(seg.workload_selector.clone()),
            policy_types: Some(types.iter().map(|t| t.to_string()).collect()),
            ..spec
        }),
    };

    let mut out = vec![policy(
        "default-deny",
        &["Ingress", "Egress"],
        NetworkPolicySpec::default(),
    )];

    let (blocks, excepted) = device_blocks(seg, isolated);
    if !blocks.is_empty() {
        let peers: Vec<NetworkPolicyPeer> = blocks
            .into_iter()
            .map(|ip_block| NetworkPolicyPeer {
                ip_block: Some(ip_block),
                ..NetworkPolicyPeer::default()
            })
            .collect();
        let ports = ports(&seg.ports);
        out.push(policy(
            "devices",
            &["Ingress", "Egress"],
            NetworkPolicySpec {
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(peers.clone()),
                    ports: ports.clone(),
                }]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(peers),
                    ports,
                }]),
                ..NetworkPolicySpec::default()
            },
        ));
    }

    for conduit in &seg.conduits {
        let peer = vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(label_selector(ZONE_LABEL, &conduit.zone)),
            ..NetworkPolicyPeer::default()
        }];
        let ports = ports(&conduit.ports);
        let suffix = format!("conduit-{}", conduit.name);
        out.push(match conduit.direction {
            ConduitDirection::Ingress => policy(
                &suffix,
                &["Ingress"],
                NetworkPolicySpec {
                    ingress: Some(vec![NetworkPolicyIngressRule {
                        from: Some(peer),
                        ports,
                    }]),
                    ..NetworkPolicySpec::default()
                },
            ),
            ConduitDirection::Egress => policy(
                &suffix,
                &["Egress"],
                NetworkPolicySpec {
                    egress: Some(vec![NetworkPolicyEgressRule {
                        to: Some(peer),
                        ports,
                    }]),
                    ..NetworkPolicySpec::default()
                },
            ),
        });
    }

    if seg.allow_dns {
        let dns_port = |protocol: &str| NetworkPolicyPort {
            port: Some(IntOrString::Int(53)),
            protocol: Some(protocol.to_string()),
            end_port: None,
        };
        out.push(policy(
            "dns",
            &["Egress"],
            NetworkPolicySpec {
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector::default()),
                        pod_selector: Some(label_selector("k8s-app", "kube-dns")),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![dns_port("UDP"), dns_port("TCP")]),
                }]),
                ..NetworkPolicySpec::default()
            },
        ));
    }
    Generated {
        policies: out,
        excepted,
    }
}

fn label_selector(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        match_expressions: None,
    }
}

/// Declared ports; none declared means every port.
fn ports(declared: &[PortSpec]) -> Option<Vec<NetworkPolicyPort>> {
    if declared.is_empty() {
        return None;
    }
    Some(
        declared
            .iter()
            .map(|p| NetworkPolicyPort {
                port: Some(IntOrString::Int(i32::from(p.port))),
                end_port: p.end_port.filter(|e| *e > p.port).map(i32::from),
                protocol: Some(format!("{:?}", p.protocol)),
            })
            .collect(),
    )
}

/// One ipBlock per device CIDR, each excepting the isolated addresses inside it. A CIDR that is
/// a single isolated address is left out entirely (an except must be strictly inside its CIDR).
fn device_blocks(
    seg: &Segmentation,
    isolated: &BTreeSet<IpAddr>,
) -> (Vec<IPBlock>, BTreeSet<IpAddr>) {
    let mut excepted = BTreeSet::new();
    let mut blocks = Vec::new();
    let cidrs: BTreeSet<Cidr> = seg
        .device_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    for cidr in cidrs {
        let inside: Vec<IpAddr> = isolated
            .iter()
            .copied()
            .filter(|a| cidr.contains(*a))
            .collect();
        excepted.extend(inside.iter().copied());
        if cidr.is_host() && !inside.is_empty() {
            continue;
        }
        blocks.push(IPBlock {
            cidr: cidr.to_string(),
            except: (!inside.is_empty())
                .then(|| inside.iter().map(|a| Cidr::host(*a).to_string()).collect()),
        });
    }
    (blocks, excepted)
}

/// The addresses a stored devices policy currently excepts (or leaves out), read back so the
/// operator can tell which devices were isolated or released by an update.
pub fn excepted_in(policy: &NetworkPolicy) -> BTreeSet<IpAddr> {
    let spec = policy.spec.as_ref();
    let peers = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten());
    peers
        .filter_map(|p| p.ip_block.as_ref())
        .flat_map(|b| b.except.iter().flatten())
        .filter_map(|e| e.parse::<Cidr>().ok())
        .filter(Cidr::is_host)
        .map(|c| c.network)
        .collect()
}

/// The addresses the stored policies isolate, so an update can be told apart into isolations and
/// releases: the except-lists of the stored devices policy, plus single-address device networks
/// it leaves out. Nothing is isolated before the zone's default-deny policy exists.
pub fn stored_isolation(
    seg: &Segmentation,
    default_deny: Option<&NetworkPolicy>,
    devices: Option<&NetworkPolicy>,
) -> BTreeSet<IpAddr> {
    if default_deny.is_none() {
        return BTreeSet::new();
    }
    let mut out = devices.map(excepted_in).unwrap_or_default();
    let present: BTreeSet<Cidr> = devices
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten())
        .filter_map(|p| p.ip_block.as_ref())
        .filter_map(|b| b.cidr.parse().ok())
        .collect();
    for cidr in seg
        .device_cidrs
        .iter()
        .filter_map(|c| c.parse::<Cidr>().ok())
    {
        if cidr.is_host() && !present.contains(&cidr) {
            out.insert(cidr.network);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Audit

/// A zone as the audit sees it.
#[derive(Clone, Debug)]
pub struct Zone<'a> {
    pub group: &'a str,
    pub namespace: &'a str,
    pub spec: &'a Segmentation,
}

impl Zone<'_> {
    fn describe(&self) -> String {
        format!("{} ({}/{})", self.spec.zone, self.namespace, self.group)
    }

    fn declares(&self, zone: &str, direction: ConduitDirection) -> bool {
        self.spec
            .conduits
            .iter()
            .any(|c| c.zone == zone && c.direction == direction)
    }
}

/// A pod, as far as policy selection cares.
#[derive(Clone, Debug)]
pub struct Pod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What the audit looks at: every zone in the cluster, the pods and NetworkPolicies of the
/// namespaces involved, and namespace labels (for `namespaceSelector`s).
pub struct AuditInputs<'a> {
    pub me: Zone<'a>,
    pub zones: Vec<Zone<'a>>,
    pub pods: Vec<Pod<'a>>,
    pub policies: Vec<&'a NetworkPolicy>,
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
}

/// Audit findings for one zone, sorted, at most `MAX_FINDINGS`; the second value is the total
/// before truncation.
pub fn audit(inp: &AuditInputs<'_>) -> (Vec<AuditFinding>, usize) {
    let me = &inp.me;
    let mut findings = Vec::new();

    // Workloads in the zone's namespace that no policy selects: they accept and open any
    // connection.
    for pod in inp.pods.iter().filter(|p| p.namespace == me.namespace) {
        if !inp.policies.iter().any(|pol| selects(pol, pod)) {
            findings.push(AuditFinding {
                kind: FindingKind::UnisolatedWorkload,
                subject: format!("pod/{}", pod.name),
                message: format!(
                    "pod {}/{} is selected by no NetworkPolicy: it accepts and opens any \
                     connection; label it {ZONE_LABEL}={} if it belongs to the zone, or cover it \
                     with a policy",
                    pod.namespace, pod.name, me.spec.zone
                ),
            });
        }
    }

    let others: Vec<&Zone<'_>> = inp
        .zones
        .iter()
        .filter(|z| !(z.group == me.group && z.namespace == me.namespace))
        .collect();

    for conduit in &me.spec.conduits {
        let peers: Vec<&&Zone<'_>> = others
            .iter()
            .filter(|z| z.spec.zone == conduit.zone)
            .collect();
        if peers.is_empty() {
            findings.push(AuditFinding {
                kind: FindingKind::UnknownConduitZone,
                subject: format!("conduit/{}", conduit.name),
                message: format!(
                    "conduit {} names zone {:?}, which no DeviceGroup declares: create the zone \
                     or fix the name",
                    conduit.name, conduit.zone
                ),
            });
            continue;
        }
        let (needed, verb) = match conduit.direction {
            ConduitDirection::Egress => (ConduitDirection::Ingress, "accept"),
            ConduitDirection::Ingress => (ConduitDirection::Egress, "open"),
        };
        for peer in peers {
            if !peer.declares(&me.spec.zone, needed) {
                findings.push(AuditFinding {
                    kind: FindingKind::OneSidedConduit,
                    subject: format!("conduit/{}", conduit.name),
                    message: format!(
                        "conduit {} ({:?}) has no counterpart: zone {} must declare the \
                         matching {:?} conduit to zone {} to {verb} these connections",
                        conduit.name,
                        conduit.direction,
                        peer.describe(),
                        needed,
                        me.spec.zone
                    ),
                });
            }
        }
    }

    let mine: Vec<Cidr> = me
        .spec
        .device_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    for other in &others {
        for theirs in other
            .spec
            .device_cidrs
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
        {
            if let Some(ours) = mine.iter().find(|m| m.overlaps(&theirs)) {
                findings.push(AuditFinding {
                    kind: FindingKind::OverlappingDeviceCIDR,
                    subject: format!("zone/{}", other.spec.zone),
                    message: format!(
                        "device network {ours} overlaps {theirs} of zone {}: a device address \
                         would belong to two zones; make the networks disjoint",
                        other.describe()
                    ),
                });
            }
        }
    }

    // IT -> OT paths: any IT workload that may open a connection to an OT workload, judged by
    // every NetworkPolicy in both namespaces, without a conduit on either side declaring it.
    let pairs: Vec<(&Zone<'_>, &Zone<'_>)> = match me.spec.level {
        ZoneLevel::IT => others
            .iter()
            .filter(|o| o.spec.level == ZoneLevel::OT)
            .map(|o| (me, *o))
            .collect(),
        ZoneLevel::OT => others
            .iter()
            .filter(|o| o.spec.level == ZoneLevel::IT)
            .map(|o| (*o, me))
            .collect(),
        ZoneLevel::DMZ => Vec::new(),
    };
    for (it, ot) in pairs {
        if it.declares(&ot.spec.zone, ConduitDirection::Egress)
            || ot.declares(&it.spec.zone, ConduitDirection::Ingress)
        {
            continue;
        }
        if let Some((from, to)) = path(inp, it, ot) {
            findings.push(AuditFinding {
                kind: FindingKind::UndeclaredITtoOTPath,
                subject: format!("zone/{}->zone/{}", it.spec.zone, ot.spec.zone),
                message: format!(
                    "IT zone {} can reach OT zone {} (pod {}/{} -> pod {}/{}) but no conduit \
                     declares it: declare the conduit or remove the policy that allows it",
                    it.describe(),
                    ot.describe(),
                    from.namespace,
                    from.name,
                    to.namespace,
                    to.name
                ),
            });
        }
    }

    findings.sort_by(|a, b| {
        (a.kind as u8, &a.subject, &a.message).cmp(&(b.kind as u8, &b.subject, &b.message))
    });
    findings.dedup();
    let total = findings.len();
    findings.truncate(MAX_FINDINGS);
    (findings, total)
}

/// The first (IT pod, OT pod) pair the policies let connect, if any.
fn path<'p>(
    inp: &'p AuditInputs<'_>,
    it: &Zone<'_>,
    ot: &Zone<'_>,
) -> Option<(&'p Pod<'p>, &'p Pod<'p>)> {
    let members = |z: &Zone<'_>| -> Vec<&'p Pod<'p>> {
        inp.pods
            .iter()
            .filter(|p| {
                p.namespace == z.namespace && selector::matches(&z.spec.workload_selector, p.labels)
            })
            .collect()
    };
    let (sources, targets) = (members(it), members(ot));
    sources.iter().find_map(|from| {
        targets
            .iter()
            .find(|to| {
                allows(inp, from, to, Direction::Egress)
                    && allows(inp, to, from, Direction::Ingress)
            })
            .map(|to| (*from, *to))
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// Whether `subject`'s policies allow traffic in `direction` with `peer` (any port). A pod no
/// policy of that type selects is not isolated in that direction.
fn allows(inp: &AuditInputs<'_>, subject: &Pod<'_>, peer: &Pod<'_>, direction: Direction) -> bool {
    let applicable: Vec<&&NetworkPolicy> = inp
        .policies
        .iter()
        .filter(|pol| selects(pol, subject) && has_type(pol, direction))
        .collect();
    if applicable.is_empty() {
        return true;
    }
    let policy_ns = subject.namespace;
    applicable.iter().any(|pol| {
        let Some(spec) = pol.spec.as_ref() else {
            return false;
        };
        let rules: Vec<Option<&Vec<NetworkPolicyPeer>>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| r.from.as_ref())
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| r.to.as_ref())
                .collect(),
        };
        rules.into_iter().any(|peers| match peers {
            None => true,
            Some(peers) if peers.is_empty() => true,
            Some(peers) => peers.iter().any(|p| peer_matches(inp, p, policy_ns, peer)),
        })
    })
}

fn peer_matches(
    inp: &AuditInputs<'_>,
    p: &NetworkPolicyPeer,
    policy_ns: &str,
    pod: &Pod<'_>,
) -> bool {
    if p.ip_block.is_some() {
        // Pod addresses are not known here; ipBlocks are meant for devices and external networks.
        return false;
    }
    let ns_ok = match &p.namespace_selector {
        None => pod.namespace == policy_ns,
        Some(sel) => {
            let empty = BTreeMap::new();
            let labels = inp.namespace_labels.get(pod.namespace).unwrap_or(&empty);
            selector::matches(sel, labels)
        }
    };
    let pod_ok = p
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector::matches(sel, pod.labels));
    ns_ok && pod_ok
}

fn selects(policy: &NetworkPolicy, pod: &Pod<'_>) -> bool {
    policy.metadata.namespace.as_deref() == Some(pod.namespace)
        && policy.spec.as_ref().is_some_and(|s| {
            s.pod_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, pod.labels))
        })
}

/// `policyTypes` as the API server defaults it: Ingress always, Egress when egress rules exist.
fn has_type(policy: &NetworkPolicy, direction: Direction) -> bool {
    let Some(spec) = policy.spec.as_ref() else {
        return false;
    };
    let wanted = match direction {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    };
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.iter().any(|t| t == wanted),
        _ => direction == Direction::Ingress || spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn group(name: &str, segmentation: serde_json::Value) -> DeviceGroup {
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1",
            "kind": "DeviceGroup",
            "metadata": {"name": name, "namespace": "plant", "uid": format!("uid-{name}")},
            "spec": {
                "certificates": {"issuerRef": {"name": "ca"}},
                "segmentation": segmentation,
            }
        }))
        .unwrap()
    }

    fn cell() -> DeviceGroup {
        group(
            "press-line-3",
            json!({
                "zone": "press-line-3",
                "level": "OT",
                "workloadSelector": {"matchLabels": {ZONE_LABEL: "press-line-3"}},
                "deviceCIDRs": ["10.30.3.0/24", "fd00:30:3::/64"],
                "ports": [{"port": 4840}, {"port": 502}],
                "conduits": [{"name": "mes-to-cell", "zone": "plant-mes", "direction": "Ingress",
                              "ports": [{"port": 4840}]}],
                "allowDNS": true,
            }),
        )
    }

    fn device(lifecycle: &str, addresses: &[&str], compliant: Option<bool>) -> Device {
        let mut status = json!({});
        if let Some(c) = compliant {
            status = json!({
                "identity": {
                    "spiffeId": "spiffe://x/ns/plant/device/d", "certificate": "",
                    "serialNumber": "01", "fingerprintSha256": "ab",
                    "notBefore": "2026-01-01T00:00:00Z", "notAfter": "2027-01-01T00:00:00Z"
                },
                "conditions": [{"type": "Compliant", "status": if c {"True"} else {"False"},
                    "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "reported": {"addresses": ["10.30.3.99"]},
                "lastSeen": "2026-11-25T11:00:00Z",
            });
        }
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": "d", "namespace": "plant"},
            "spec": {"group": "press-line-3", "hardwareModel": "m", "lifecycle": lifecycle,
                     "addresses": addresses},
            "status": status,
        }))
        .unwrap()
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn find<'a>(generated: &'a Generated, name: &str) -> &'a NetworkPolicySpec {
        generated
            .policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.spec.as_ref())
            .unwrap_or_else(|| panic!("no policy {name}"))
    }

    #[test]
    fn cidrs_parse_normalise_and_compare() {
        let net: Cidr = "10.30.3.7/24".parse().unwrap();
        assert_eq!(net.to_string(), "10.30.3.0/24");
        assert!(net.contains("10.30.3.250".parse().unwrap()));
        assert!(!net.contains("10.30.4.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let wide: Cidr = "10.30.0.0/16".parse().unwrap();
        assert!(net.overlaps(&wide) && wide.overlaps(&net));
        assert!(!net.overlaps(&"10.31.0.0/16".parse().unwrap()));
        let v6: Cidr = "fd00:30:3::1/64".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00:30:3::/64");
        assert!(!v6.overlaps(&net));
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(
            Cidr::host("fd00::7".parse().unwrap()).to_string(),
            "fd00::7/128"
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0/8",
            "",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.to_string().contains("address/prefix"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_zone_gets_default_deny_device_networks_conduits_and_dns() {
        let generated = policies(&cell(), &BTreeSet::new());
        let names: Vec<_> = generated
            .policies
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "fw-press-line-3-default-deny",
                "fw-press-line-3-devices",
                "fw-press-line-3-conduit-mes-to-cell",
                "fw-press-line-3-dns"
            ]
        );
        for p in &generated.policies {
            let labels = p.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[MANAGED_BY_LABEL], "fleetwarden");
            assert_eq!(labels[GROUP_LABEL], "press-line-3");
            let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("DeviceGroup", "uid-press-line-3")
            );
            assert_eq!(owner.controller, Some(true));
            assert_eq!(p.metadata.namespace.as_deref(), Some("plant"));
            let selector = p.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
            assert_eq!(
                selector.match_labels.as_ref().unwrap()[ZONE_LABEL],
                "press-line-3"
            );
        }

        let deny = find(&generated, "fw-press-line-3-default-deny");
        assert_eq!(deny.policy_types.as_deref().unwrap(), ["Ingress", "Egress"]);
        assert!(deny.ingress.is_none() && deny.egress.is_none());

        let devices = find(&generated, "fw-press-line-3-devices");
        let ingress = &devices.ingress.as_ref().unwrap()[0];
        let cidrs: Vec<_> = ingress
            .from
            .iter()
            .flatten()
            .map(|p| p.ip_block.as_ref().unwrap().cidr.clone())
            .collect();
        assert_eq!(cidrs, ["10.30.3.0/24", "fd00:30:3::/64"]);
        let ports: Vec<_> = ingress
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port.clone(), p.protocol.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some(IntOrString::Int(4840)), Some("TCP".into())),
                (Some(IntOrString::Int(502)), Some("TCP".into()))
            ]
        );
        let egress = &devices.egress.as_ref().unwrap()[0];
        assert_eq!(egress.to, ingress.from);
        assert_eq!(egress.ports, ingress.ports);

        let conduit = find(&generated, "fw-press-line-3-conduit-mes-to-cell");
        assert_eq!(conduit.policy_types.as_deref().unwrap(), ["Ingress"]);
        let from = &conduit.ingress.as_ref().unwrap()[0].from.as_ref().unwrap()[0];
        assert_eq!(from.namespace_selector, Some(LabelSelector::default()));
        assert_eq!(
            from.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[ZONE_LABEL],
            "plant-mes"
        );
        assert!(conduit.egress.is_none());

        let dns = find(&generated, "fw-press-line-3-dns");
        assert_eq!(dns.policy_types.as_deref().unwrap(), ["Egress"]);
        assert_eq!(
            dns.egress.as_ref().unwrap()[0]
                .ports
                .as_ref()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn isolated_addresses_are_excepted_from_their_own_network_only() {
        let isolated = ips(&["10.30.3.7", "10.30.3.9", "fd00:30:3::7", "192.168.1.1"]);
        let generated = policies(&cell(), &isolated);
        assert_eq!(
            generated.excepted,
            ips(&["10.30.3.7", "10.30.3.9", "fd00:30:3::7"]),
            "an address outside every device network needs no except"
        );
        let devices = find(&generated, "fw-press-line-3-devices");
        let blocks: Vec<_> = devices.ingress.as_ref().unwrap()[0]
            .from
            .iter()
            .flatten()
            .map(|p| p.ip_block.clone().unwrap())
            .collect();
        assert_eq!(
            blocks[0].except.as_deref().unwrap(),
            ["10.30.3.7/32", "10.30.3.9/32"]
        );
        assert_eq!(blocks[1].except.as_deref().unwrap(), ["fd00:30:3::7/128"]);
        let stored = generated
            .policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("fw-press-line-3-devices"))
            .unwrap();
        assert_eq!(excepted_in(stored), generated.excepted);
        // Releasing everything empties the except-lists again.
        let released = policies(&cell(), &BTreeSet::new());
        let devices = find(&released, "fw-press-line-3-devices");
        assert!(
            devices.ingress.as_ref().unwrap()[0]
                .from
                .iter()
                .flatten()
                .all(|p| p.ip_block.as_ref().unwrap().except.is_none())
        );
    }

    #[test]
    fn isolating_a_single_address_network_never_opens_everything() {
        let g = group(
            "one",
            json!({"zone": "one", "workloadSelector": {"matchLabels": {"app": "x"}},
                   "deviceCIDRs": ["10.9.9.9/32"], "allowDNS": false}),
        );
        let open = policies(&g, &BTreeSet::new());
        assert_eq!(open.policies.len(), 2);
        let cut = policies(&g, &ips(&["10.9.9.9"]));
        // No peers left: the devices policy is dropped instead of becoming an allow-all rule.
        assert_eq!(cut.policies.len(), 1);
        assert_eq!(
            cut.policies[0].metadata.name.as_deref(),
            Some("fw-one-default-deny")
        );
        assert_eq!(cut.excepted, ips(&["10.9.9.9"]));
    }

    #[test]
    fn what_the_stored_policies_isolate_is_read_back() {
        let g = group(
            "two",
            json!({"zone": "two", "workloadSelector": {},
                   "deviceCIDRs": ["10.9.9.9/32", "10.8.0.0/16"], "allowDNS": false}),
        );
        let seg = g.spec.segmentation.clone().unwrap();
        let isolated = ips(&["10.9.9.9", "10.8.0.5"]);
        let generated = policies(&g, &isolated);
        let by_name = |n: &str| {
            generated
                .policies
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(n))
        };
        let (deny, devices) = (by_name("fw-two-default-deny"), by_name("fw-two-devices"));
        assert!(devices.is_some());
        assert_eq!(stored_isolation(&seg, deny, devices), isolated);
        // Before the zone exists nothing was isolated, so every isolation is new.
        assert!(stored_isolation(&seg, None, devices).is_empty());
        let open = policies(&g, &BTreeSet::new());
        let open_devices = open
            .policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("fw-two-devices"));
        assert!(stored_isolation(&seg, deny, open_devices).is_empty());
    }

    #[test]
    fn no_segmentation_means_no_policies() {
        let mut g = cell();
        g.spec.segmentation = None;
        let generated = policies(&g, &ips(&["10.30.3.7"]));
        assert!(generated.policies.is_empty() && generated.excepted.is_empty());
    }

    #[test]
    fn devices_are_isolated_by_lifecycle_or_failed_compliance() {
        let spec = cell().spec;
        assert_eq!(isolation(&device("Active", &[], Some(true)), &spec), None);
        assert_eq!(
            isolation(&device("Active", &[], Some(false)), &spec),
            Some(IsolationReason::NonCompliant)
        );
        assert_eq!(
            isolation(&device("Active", &[], None), &spec),
            None,
            "not enrolled yet"
        );
        let mut silent = device("Active", &[], Some(false));
        silent.status.as_mut().unwrap().last_seen = None;
        assert_eq!(
            isolation(&silent, &spec),
            None,
            "enrolled, never checked in: posture unknown"
        );
        // Just checked in, but the verdict is still the one from before (the operator has not
        // judged the first report yet): not a reason to isolate.
        let mut first_report = device("Active", &[], Some(false));
        for c in &mut first_report.status.as_mut().unwrap().conditions {
            if c.type_ == types::COMPLIANT {
                c.reason = "NeverSeen".into();
                c.message = "NeverSeen: the device has never checked in".into();
            }
        }
        assert_eq!(isolation(&first_report, &spec), None, "stale verdict");
        assert_eq!(
            isolation(&device("Quarantined", &[], Some(true)), &spec),
            Some(IsolationReason::Quarantined)
        );
        assert_eq!(
            isolation(&device("Suspended", &[], None), &spec),
            Some(IsolationReason::Suspended)
        );
        assert_eq!(
            isolation(&device("Retired", &[], None), &spec),
            Some(IsolationReason::Retired)
        );
        let mut lenient = spec.clone();
        lenient.compliance.quarantine_non_compliant = false;
        assert_eq!(
            isolation(&device("Active", &[], Some(false)), &lenient),
            None
        );

        let d = device(
            "Active",
            &["10.30.3.7", "not-an-ip", " fd00::7 "],
            Some(false),
        );
        assert_eq!(addresses(&d), ips(&["10.30.3.7", "10.30.3.99", "fd00::7"]));
    }

    #[test]
    fn long_group_names_give_valid_unique_policy_names() {
        let long = "a".repeat(253);
        let n1 = policy_name(&long, "conduit-x");
        let n2 = policy_name(&format!("{}b", "a".repeat(252)), "conduit-x");
        assert!(n1.len() <= 253 && n2.len() <= 253);
        assert!(n1.ends_with("-conduit-x") && n1.starts_with("fw-aaa"));
        assert_ne!(n1, n2);
        assert_eq!(policy_name("g", "dns"), "fw-g-dns");
    }

    fn zone<'a>(group: &'a str, spec: &'a Segmentation) -> Zone<'a> {
        Zone {
            group,
            namespace: "plant",
            spec,
        }
    }

    fn seg(v: serde_json::Value) -> Segmentation {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_audit_finds_unisolated_pods_unknown_and_one_sided_conduits_and_overlaps() {
        let cell_group = cell();
        let cell_seg = cell_group.spec.segmentation.clone().unwrap();
        let mes = seg(json!({"zone": "plant-mes", "level": "IT",
            "workloadSelector": {"matchLabels": {ZONE_LABEL: "plant-mes"}},
            "deviceCIDRs": ["10.30.0.0/16"],
            "conduits": [{"name": "x", "zone": "nowhere", "direction": "Egress", "ports": [{"port": 1}]}]}));
        let generated = policies(&cell_group, &BTreeSet::new());
        let zone_pod = labels(&[(ZONE_LABEL, "press-line-3")]);
        let stray = labels(&[("app", "debug-shell")]);
        let pods = vec![
            Pod {
                namespace: "plant",
                name: "opcua-gw",
                labels: &zone_pod,
            },
            Pod {
                namespace: "plant",
                name: "debug",
                labels: &stray,
            },
        ];
        let ns = BTreeMap::new();
        let inputs = AuditInputs {
            me: zone("press-line-3", &cell_seg),
            zones: vec![zone("press-line-3", &cell_seg), zone("mes", &mes)],
            pods: pods.clone(),
            policies: generated.policies.iter().collect(),
            namespace_labels: &ns,
        };
        let (findings, total) = audit(&inputs);
        let kinds: Vec<_> = findings
            .iter()
            .map(|f| (f.kind, f.subject.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (FindingKind::UnisolatedWorkload, "pod/debug"),
                (FindingKind::OverlappingDeviceCIDR, "zone/plant-mes"),
                (FindingKind::OneSidedConduit, "conduit/mes-to-cell"),
            ]
        );
        assert_eq!(total, 3);
        assert!(
            findings[2]
                .message
                .contains("matching Egress conduit to zone press-line-3"),
            "{}",
            findings[2].message
        );

        // From the MES side: its conduit to a zone nobody declares.
        let mes_inputs = AuditInputs {
            me: zone("mes", &mes),
            ..inputs
        };
        let (findings, _) = audit(&mes_inputs);
        assert!(
            findings
                .iter()
                .any(|f| f.kind == FindingKind::UnknownConduitZone
                    && f.subject == "conduit/x"
                    && f.message.contains("\"nowhere\""))
        );
    }

    #[test]
    fn the_audit_finds_it_to_ot_paths_that_no_conduit_declares() {
        let ot = seg(json!({"zone": "cell", "level": "OT",
            "workloadSelector": {"matchLabels": {ZONE_LABEL: "cell"}}}));
        let it = seg(json!({"zone": "office", "level": "IT",
            "workloadSelector": {"matchLabels": {ZONE_LABEL: "office"}}}));
        let cell_pod = labels(&[(ZONE_LABEL, "cell")]);
        let office_pod = labels(&[(ZONE_LABEL, "office")]);
        let pods = vec![
            Pod {
                namespace: "plant",
                name: "plc-proxy",
                labels: &cell_pod,
            },
            Pod {
                namespace: "plant",
                name: "erp",
                labels: &office_pod,
            },
        ];
        let ns = BTreeMap::new();
        let policy = |name: &str, v: serde_json::Value| -> NetworkPolicy {
            serde_json::from_value(
                json!({"metadata": {"name": name, "namespace": "plant"}, "spec": v}),
            )
            .unwrap()
        };
        let leaks = |policies: &[NetworkPolicy], it: &Segmentation, ot: &Segmentation| {
            let inputs = AuditInputs {
                me: zone("cell", ot),
                zones: vec![zone("cell", ot), zone("office", it)],
                pods: pods.clone(),
                policies: policies.iter().collect(),
                namespace_labels: &ns,
            };
            audit(&inputs)
                .0
                .into_iter()
                .filter(|f| f.kind == FindingKind::UndeclaredITtoOTPath)
                .collect::<Vec<_>>()
        };
        // No policies at all: everything talks to everything.
        let found = leaks(&[], &it, &ot);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].subject, "zone/office->zone/cell");
        assert!(
            found[0]
                .message
                .contains("plant/erp -> pod plant/plc-proxy")
        );

        // Both zones default-deny: no path.
        let deny = |z: &str| {
            policy(
                &format!("deny-{z}"),
                json!({
            "podSelector": {"matchLabels": {ZONE_LABEL: z}}, "policyTypes": ["Ingress", "Egress"]}),
            )
        };
        let mut closed = vec![deny("cell"), deny("office")];
        assert!(leaks(&closed, &it, &ot).is_empty());

        // A stray allow-from-anywhere policy on the OT workloads, but IT egress still denied.
        closed.push(policy(
            "open-cell",
            json!({
            "podSelector": {"matchLabels": {ZONE_LABEL: "cell"}}, "ingress": [{}]}),
        ));
        assert!(leaks(&closed, &it, &ot).is_empty());
        // ... and once IT egress is opened too, the path exists.
        closed.push(policy(
            "open-office",
            json!({
            "podSelector": {"matchLabels": {ZONE_LABEL: "office"}},
            "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {}}]}]}),
        ));
        assert_eq!(leaks(&closed, &it, &ot).len(), 1);

        // A declared conduit makes the same path intended.
        let mut declared = ot.clone();
        declared.conduits = serde_json::from_value(json!([{"name": "erp", "zone": "office",
            "direction": "Ingress", "ports": [{"port": 443}]}]))
        .unwrap();
        assert!(leaks(&closed, &it, &declared).is_empty());

        // An ipBlock-only rule does not match pods.
        let ip_only = vec![policy(
            "ip",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}),
        )];
        assert!(leaks(&ip_only, &it, &ot).is_empty());
    }

    #[test]
    fn namespace_selectors_are_judged_on_namespace_labels() {
        let ot = seg(json!({"zone": "cell", "level": "OT",
            "workloadSelector": {"matchLabels": {ZONE_LABEL: "cell"}}}));
        let it = seg(json!({"zone": "office", "level": "IT",
            "workloadSelector": {"matchLabels": {ZONE_LABEL: "office"}}}));
        let cell_pod = labels(&[(ZONE_LABEL, "cell")]);
        let office_pod = labels(&[(ZONE_LABEL, "office")]);
        let pods = vec![
            Pod {
                namespace: "ot",
                name: "plc-proxy",
                labels: &cell_pod,
            },
            Pod {
                namespace: "it",
                name: "erp",
                labels: &office_pod,
            },
        ];
        let pol: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "from-trusted", "namespace": "ot"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector":
                {"matchLabels": {"trust": "high"}}}]}]}}))
        .unwrap();
        let run = |ns_labels: &BTreeMap<String, BTreeMap<String, String>>| {
            let inputs = AuditInputs {
                me: Zone {
                    group: "cell",
                    namespace: "ot",
                    spec: &ot,
                },
                zones: vec![Zone {
                    group: "office",
                    namespace: "it",
                    spec: &it,
                }],
                pods: pods.clone(),
                policies: vec![&pol],
                namespace_labels: ns_labels,
            };
            audit(&inputs)
                .0
                .iter()
                .filter(|f| f.kind == FindingKind::UndeclaredITtoOTPath)
                .count()
        };
        assert_eq!(run(&BTreeMap::new()), 0);
        let trusted = BTreeMap::from([("it".to_string(), labels(&[("trust", "high")]))]);
        assert_eq!(run(&trusted), 1);
    }
}
