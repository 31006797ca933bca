//! The agent's main loop: one pod watch feeding binding and supervision.
//!
//! A single task owns all bookkeeping (which pods are queued, being bound,
//! supervised, finished), so nothing is shared or locked: supervisors only receive
//! pod versions over their `watch` channel and report back by ending.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use tokio::{
    sync::watch,
    task::{Id, JoinError, JoinSet},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Error, Result, args::Settings, node, pod, scheduling, status::Phase};

/// How often binding is retried for pods that are waiting (capacity, API errors),
/// besides every pod event and every finished pod.
const BIND_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a binding request may block the loop.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the agent waits for supervisors to stop their processes on shutdown before
/// aborting them (which still kills their process groups).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the final NotReady update may take.
const NOT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What every supervisor needs.
pub(super) struct Context {
    pub client: Client,
    pub settings: Settings,
}

/// Registers the node, runs the loop until `shutdown` (or a fatal error), then stops
/// every process and marks the node NotReady.
pub(super) async fn run(client: Client, settings: Settings, shutdown: CancellationToken) -> Result<()> {
    let node = node::register(client.clone(), &settings.node_name, settings.max_pods).await?;
    // A child token, so that a fatal error inside the loop also stops the heartbeat
    // and every supervisor.
    let stop = shutdown.child_token();
    let heartbeat = tokio::spawn({
        let node = node.clone();
        let stop = stop.clone();
        async move { node.keep_alive(stop).await }
    });
    info!(
        node = %settings.node_name,
        binary = %settings.binary.display(),
        namespace = settings.namespace.as_deref().unwrap_or("<all>"),
        work_dir = %settings.work_dir.display(),
        max_pods = settings.max_pods,
        "node agent running"
    );

    let labels = node::node_labels(&settings.node_name);
    let ctx = Arc::new(Context { client, settings });
    let mut agent = Agent::new(ctx, labels, stop.clone());
    let result = agent.run().await;
    stop.cancel();
    agent.drain().await;
    if let Err(error) = heartbeat.await {
        warn!(%error, "node heartbeat task failed");
    }
    match tokio::time::timeout(NOT_READY_TIMEOUT, node.mark_not_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "could not mark the node NotReady"),
        Err(_) => warn!("timed out marking the node NotReady"),
    }
    info!("node agent stopped");
    result
}

/// What woke the loop.
enum Wake {
    Stop,
    Worker(std::result::Result<(Id, ()), JoinError>),
    /// Boxed: a pod is large, and the other wake-ups are tiny.
    Pod(Box<Option<std::result::Result<Event<Pod>, watcher::Error>>>),
    Tick,
}

struct Agent {
    ctx: Arc<Context>,
    node_labels: BTreeMap<String, String>,
    stop: CancellationToken,
    /// Supervised pods by uid. Each sender carries new pod versions to its
    /// supervisor; dropping it tells the supervisor the pod is gone.
    supervised: HashMap<String, watch::Sender<Arc<Pod>>>,
    workers: JoinSet<()>,
    worker_uids: HashMap<Id, String>,
    /// Unassigned pods this node would take, waiting for a free slot.
    queue: HashMap<String, Arc<Pod>>,
    /// Pods bound here whose binding the watch has not shown yet. They hold a slot,
    /// and stale unassigned versions of them are ignored.
    binding: HashSet<String>,
    /// Pods whose supervision ended. Watch events for them are either stale (from
    /// before the final status) or terminal; neither must start them again.
    finished: HashSet<String>,
    /// Pods listed since the watch (re)started, to forget those that vanished meanwhile.
    relisting: Option<HashSet<String>>,
}

impl Agent {
    fn new(ctx: Arc<Context>, node_labels: BTreeMap<String, String>, stop: CancellationToken) -> Self {
        Self {
            ctx,
            node_labels,
            stop,
            supervised: HashMap::new(),
            workers: JoinSet::new(),
            worker_uids: HashMap::new(),
            queue: HashMap::new(),
            binding: HashSet::new(),
            finished: HashSet::new(),
            relisting: None,
        }
    }

    async fn run(&mut self) -> Result<()> {
        let api: Api<Pod> = match &self.ctx.settings.namespace {
            Some(namespace) => Api::namespaced(self.ctx.client.clone(), namespace),
            None => Api::all(self.ctx.client.clone()),
        };
        let mut events: BoxStream<'static, _> =
            watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut ticks = tokio::time::interval(BIND_RETRY_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                _ = self.stop.cancelled() => Wake::Stop,
                Some(joined) = self.workers.join_next_with_id() => Wake::Worker(joined),
                event = events.next() => Wake::Pod(Box::new(event)),
                _ = ticks.tick() => Wake::Tick,
            };
            match wake {
                Wake::Stop => return Ok(()),
                Wake::Worker(joined) => self.worker_done(joined),
                Wake::Pod(event) => match *event {
                    Some(Ok(event)) => self.handle(event),
                    Some(Err(error)) => warn!(%error, "pod watch failed; retrying with back-off"),
                    None => return Err(Error::WatchEnded),
                },
                Wake::Tick => {}
            }
            self.bind_queued().await;
        }
    }

    fn handle(&mut self, event: Event<Pod>) {
        match event {
            Event::Apply(pod) => self.observe(pod),
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.forget(uid);
                }
            }
            Event::Init => self.relisting = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (self.relisting.as_mut(), pod.metadata.uid.as_ref()) {
                    seen.insert(uid.clone());
                }
                self.observe(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    let known = self
                        .supervised
                        .keys()
                        .chain(self.queue.keys())
                        .chain(self.binding.iter())
                        .chain(self.finished.iter());
                    let vanished: Vec<String> = known.filter(|uid| !seen.contains(*uid)).cloned().collect();
                    for uid in vanished {
                        self.forget(&uid);
                    }
                }
            }
        }
    }

    /// Routes one pod version: to its supervisor, to a new supervisor, to the bind
    /// queue, or nowhere.
    fn observe(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else { return };
        if self.finished.contains(&uid) {
            return;
        }
        let node_name = pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()).unwrap_or("");
        if node_name == self.ctx.settings.node_name {
            self.queue.remove(&uid);
            self.binding.remove(&uid);
            if let Some(sender) = self.supervised.get(&uid) {
                sender.send_replace(Arc::new(pod));
                return;
            }
            let terminal = pod
                .status
                .as_ref()
                .and_then(|status| Phase::parse(status.phase.as_deref()))
                .is_some_and(Phase::is_terminal);
            if terminal {
                self.finished.insert(uid);
            } else {
                self.supervise(uid, pod);
            }
        } else if node_name.is_empty() {
            if self.binding.contains(&uid) {
                return;
            }
            if scheduling::is_bindable(&pod, &self.node_labels) {
                self.queue.insert(uid, Arc::new(pod));
            } else {
                self.queue.remove(&uid);
            }
        } else {
            self.queue.remove(&uid);
            self.binding.remove(&uid);
        }
    }

    fn supervise(&mut self, uid: String, pod: Pod) {
        let span = info_span!(
            "pod",
            namespace = pod.metadata.namespace.as_deref().unwrap_or(""),
            pod = pod.metadata.name.as_deref().unwrap_or(""),
        );
        let (sender, receiver) = watch::channel(Arc::new(pod));
        let task = pod::supervise(self.ctx.clone(), receiver, self.stop.clone()).instrument(span);
        let handle = self.workers.spawn(task);
        self.worker_uids.insert(handle.id(), uid.clone());
        self.supervised.insert(uid, sender);
    }

    fn forget(&mut self, uid: &str) {
        // Dropping the sender tells a supervisor its pod is gone.
        self.supervised.remove(uid);
        self.queue.remove(uid);
        self.binding.remove(uid);
        self.finished.remove(uid);
    }

    fn worker_done(&mut self, joined: std::result::Result<(Id, ()), JoinError>) {
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(join_error) => {
                error!(error = %join_error, "pod supervisor failed");
                join_error.id()
            }
        };
        if let Some(uid) = self.worker_uids.remove(&id) {
            // Still known: the pod remains in the API with its final status.
            if self.supervised.remove(&uid).is_some() {
                self.finished.insert(uid);
            }
        }
    }

    /// Binds queued pods, oldest first, while the node has free slots.
    async fn bind_queued(&mut self) {
        let node = self.ctx.settings.node_name.clone();
        while self.supervised.len() + self.binding.len() < self.ctx.settings.max_pods && !self.stop.is_cancelled() {
            let Some(next) = self.queue.values().min_by_key(|pod| scheduling::queue_key(pod)).cloned() else {
                return;
            };
            let (Some(uid), Some(namespace), Some(name)) =
                (next.metadata.uid.clone(), next.metadata.namespace.as_deref(), next.metadata.name.as_deref())
            else {
                continue;
            };
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace);
            match tokio::time::timeout(BIND_TIMEOUT, scheduling::bind(&api, name, &node)).await {
                Ok(Ok(scheduling::BindOutcome::Bound)) => {
                    info!(namespace, pod = name, node = %node, "pod bound");
                    self.queue.remove(&uid);
                    self.binding.insert(uid);
                }
                Ok(Ok(scheduling::BindOutcome::Lost)) => {
                    debug!(namespace, pod = name, "pod was taken or deleted before binding");
                    self.queue.remove(&uid);
                }
                Ok(Err(error)) => {
                    warn!(namespace, pod = name, %error, "binding failed; will retry");
                    return;
                }
                Err(_) => {
                    warn!(namespace, pod = name, "binding timed out; will retry");
                    return;
                }
            }
        }
    }

    /// Waits for every supervisor to stop its process; aborts stragglers, whose
    /// dropped process handles still kill their groups.
    async fn drain(&mut self) {
        let workers = &mut self.workers;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while workers.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!("pod supervisors did not stop in time; aborting them");
            self.workers.abort_all();
            while self.workers.join_next().await.is_some() {}
        }
        self.supervised.clear();
        self.worker_uids.clear();
    }
}
