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
/// The vcpu actor's mailbox: an unbounded deque (so the actor can stash while a read is in
/// flight) that kicks the vcpu thread out of KVM_RUN when a <see cref="VcpuProtocol.IKicking"/>
/// message is enqueued. The kick comes after the enqueue, so the vcpu sees the message before it
/// enters the guest again. Other messages (device replies, credits) never kick: they arrive while
/// the vcpu is out of the guest, waiting for them.
/// </summary>
public sealed class VcpuMailboxType(Settings settings, Config config)
    : MailboxType(settings, config), IProducesMessageQueue<VcpuMessageQueue>
{
    public override IMessageQueue Create(IActorRef owner, ActorSystem system) =>
        new VcpuMessageQueue(owner, MessageTraceRegistry.SinkFor(system, owner), LinkFaultRegistry.PlanFor(system, owner));
}

public sealed class VcpuMessageQueue : IMessageQueue, IUnboundedDequeBasedMessageQueueSemantics
{
    private readonly IActorRef _owner;
    private readonly TracedMessageQueue _queue;
    private IVcpu? _vcpu;
    private long _lastUrgent;

    public VcpuMessageQueue(IActorRef owner, ITraceSink? trace = null, LinkFaultPlan? faults = null)
    {
        _owner = owner;
        // The traced deque (with tracing and fault injection off it only queues): it kicks, through
        // its arrival callback, when a message really arrives, and lets the actor peek at its head.
        _queue = new TracedMessageQueue(owner, trace, faults, KickIfUrgent);
    }

    public bool HasMessages => _queue.HasMessages;

    /// <summary>When the last urgent message (one that kicks) arrived, in Stopwatch ticks: when a
    /// halted vcpu was woken, as opposed to when its thread got round to it.</summary>
    public long LastUrgentTicks => Volatile.Read(ref _lastUrgent);

    public int Count => _queue.Count;

    public void Enqueue(IActorRef receiver, Envelope envelope) => _queue.Enqueue(receiver, envelope);

    /// <summary>The message first in line, left there; only the owner's thread may ask.</summary>
    public bool TryPeek([System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out object? message) => _queue.TryPeek(out message);

    // Akka's own Identify (ActorSelection.ResolveOne), PoisonPill and Kill must be seen
    // promptly too, or a vcpu spinning in the guest would never answer them. The vlapic's
    // events (interrupt pending, NMI, INIT, SIPI, ExtINT) are the seed's vcpu_notify_event.
    // Messages from Akka's scheduler (ScheduleTell*) arrive wrapped: the kick looks inside.
    private void KickIfUrgent(Envelope envelope)
    {
        var message = envelope.Message;
        while (message is IWrappedMessage wrapped) message = wrapped.Message;
        if (message is VcpuProtocol.IKicking or Lapic.VlapicProtocol.IVcpuEvent or FaultProtocol.IFaultMessage
            or Memory.VmspaceProtocol.InvalidateEpt
            or Identify or PoisonPill or Kill)
        {
            Volatile.Write(ref _lastUrgent, System.Diagnostics.Stopwatch.GetTimestamp());
            var vcpu = _vcpu ??= VcpuKickRegistry.Find(_owner);
            vcpu?.Kick();
        }
    }

    public void EnqueueFirst(Envelope envelope) => _queue.EnqueueFirst(envelope);
    public bool TryDequeue(out Envelope envelope) => _queue.TryDequeue(out envelope);
    public void CleanUp(IActorRef owner, IMessageQueue deadletters) => _queue.CleanUp(owner, deadletters);
}

/// <summary>Which vcpu thread to kick for which actor; a vcpu actor registers itself while it lives.</summary>
public static class VcpuKickRegistry
{
    private static readonly ConcurrentDictionary<IActorRef, IVcpu> Vcpus = new();

    public static void Register(IActorRef actor, IVcpu vcpu) => Vcpus[actor] = vcpu;
    public static void Unregister(IActorRef actor) => Vcpus.TryRemove(actor, out _);
    public static IVcpu? Find(IActorRef actor) => Vcpus.TryGetValue(actor, out var v) ? v : null;
}
