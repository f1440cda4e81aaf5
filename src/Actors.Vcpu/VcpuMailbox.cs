using System.Collections.Concurrent;
using Akka.Actor;
using Akka.Configuration;
using Akka.Dispatch;
using Akka.Dispatch.MessageQueues;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>
/// The vcpu actor's mailbox: an unbounded deque (so the actor can stash while a reply is in
/// flight) that kicks the vcpu thread out of KVM_RUN when an <see cref="IVcpuNotify"/> message is
/// enqueued. The kick comes after the enqueue, so the vcpu sees the message before it enters the
/// guest again. Other messages (device replies, credits) never kick: they arrive while the vcpu is
/// out of the guest, waiting for them.
/// </summary>
public sealed class VcpuMailboxType(Settings settings, Config config)
    : MailboxType(settings, config), IProducesMessageQueue<VcpuMessageQueue>
{
    public override IMessageQueue Create(IActorRef owner, ActorSystem system)
    {
        var vcpus = VcpuQueues.For(system);
        var queue = new VcpuMessageQueue(owner, MessageTraceRegistry.SinkFor(system, owner), LinkFaultRegistry.PlanFor(system, owner),
            vcpus);
        vcpus.Add(owner, queue);
        return queue;
    }
}

public sealed class VcpuMessageQueue : IMessageQueue, IUnboundedDequeBasedMessageQueueSemantics
{
    private readonly IActorRef _owner;
    private readonly TracedMessageQueue _queue;
    private readonly VcpuQueues? _registry;
    private long _lastUrgent;

    public VcpuMessageQueue(IActorRef owner, ITraceSink? trace = null, LinkFaultPlan? faults = null, VcpuQueues? registry = null)
    {
        _owner = owner;
        _registry = registry;
        // The traced deque (with tracing and fault injection off it only queues): it kicks, through
        // its arrival callback, when a message really arrives, and lets the actor peek at its head.
        _queue = new TracedMessageQueue(owner, trace, faults, KickIfUrgent);
    }

    /// <summary>The KVM vcpu to kick; set by the vcpu actor while it lives (null: nothing to kick).</summary>
    public IVcpu? Vcpu { get; set; }

    public bool HasMessages => _queue.HasMessages;

    /// <summary>When the last urgent message (one that kicks) arrived, in Stopwatch ticks: when a
    /// halted vcpu was woken, as opposed to when its thread got round to it.</summary>
    public long LastUrgentTicks => Volatile.Read(ref _lastUrgent);

    public int Count => _queue.Count;

    public void Enqueue(IActorRef receiver, Envelope envelope) => _queue.Enqueue(receiver, envelope);

    /// <summary>The message first in line, left there; only the owner's thread may ask.</summary>
    public bool TryPeek([System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out object? message) => _queue.TryPeek(out message);

    // Akka's own Identify (ActorSelection.ResolveOne), PoisonPill and Kill must be seen promptly
    // too, or a vcpu spinning in the guest would never answer them. Messages from Akka's scheduler
    // (ScheduleTell*) arrive wrapped: the kick looks inside.
    private void KickIfUrgent(Envelope envelope)
    {
        var message = envelope.Message;
        while (message is IWrappedMessage wrapped) message = wrapped.Message;
        if (message is not (IVcpuNotify or Identify or PoisonPill or Kill)) return;
        Volatile.Write(ref _lastUrgent, System.Diagnostics.Stopwatch.GetTimestamp());
        Vcpu?.Kick();
    }

    public void EnqueueFirst(Envelope envelope) => _queue.EnqueueFirst(envelope);
    public bool TryDequeue(out Envelope envelope) => _queue.TryDequeue(out envelope);

    public void CleanUp(IActorRef owner, IMessageQueue deadletters)
    {
        Vcpu = null;
        _registry?.Remove(_owner, this);
        _queue.CleanUp(owner, deadletters);
    }
}

/// <summary>
/// The vcpu mailboxes of one actor system (an Akka extension), by owner: a vcpu actor finds its
/// own queue here to peek at it, to look for messages between two runs and to name the KVM vcpu its
/// mailbox kicks.
/// </summary>
public sealed class VcpuQueues : IExtension
{
    private readonly ConcurrentDictionary<IActorRef, VcpuMessageQueue> _queues = new();

    public static VcpuQueues For(ActorSystem system) => system.WithExtension<VcpuQueues, VcpuQueuesProvider>();

    internal void Add(IActorRef owner, VcpuMessageQueue queue) => _queues[owner] = queue;

    internal void Remove(IActorRef owner, VcpuMessageQueue queue) =>
        _queues.TryRemove(new KeyValuePair<IActorRef, VcpuMessageQueue>(owner, queue));

    /// <summary>The queue of the vcpu actor <paramref name="owner"/>; it must run with the vcpu mailbox.</summary>
    public VcpuMessageQueue Of(IActorRef owner) =>
        _queues.TryGetValue(owner, out var queue)
            ? queue
            : throw new InvalidOperationException($"{owner.Path} has no vcpu mailbox: a vcpu actor needs mailbox {VcpuProtocol.MailboxId}");
}

public sealed class VcpuQueuesProvider : ExtensionIdProvider<VcpuQueues>
{
    public override VcpuQueues CreateExtension(ExtendedActorSystem system) => new();
}
