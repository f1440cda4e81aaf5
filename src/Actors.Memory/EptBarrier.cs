using Akka.Actor;

namespace ActorVmm.Memory;

/// <summary>
/// The seed's <c>pmap_invalidate_ept()</c>: a generation number per vmspace and the vcpus that must
/// acknowledge it. A change vcpus must see bumps the generation and sends
/// <see cref="VmspaceProtocol.InvalidateEpt"/> to every registered vcpu; the change is complete once
/// each has acked that generation (or a later one). There is no "not running, acks at once"
/// shortcut here: a paused or halted vcpu acks from its own thread as soon as the request arrives
/// (it is out of the guest), and only that thread can harvest its dirty ring first, which a
/// shortcut would skip. Kicking a vcpu spinning in the guest is the vcpu side's job (its mailbox
/// kicks on this message).
/// </summary>
internal sealed class EptBarrier
{
    private sealed class Vcpu(IActorRef actor, ulong acked)
    {
        public IActorRef Actor { get; } = actor;
        public ulong Acked { get; set; } = acked;
    }

    private readonly Dictionary<int, Vcpu> _vcpus = [];
    private readonly List<(ulong Generation, Action Complete)> _waiting = [];

    public ulong Generation { get; private set; }
    public int Registered => _vcpus.Count;
    public int Waiting => _waiting.Count;

    /// <summary>A vcpu joins; it has nothing stale (it will enter with the current state).</summary>
    public void Register(int vcpuId, IActorRef vcpu)
    {
        _vcpus[vcpuId] = new Vcpu(vcpu, Generation);
        CompleteSatisfied();
    }

    public void Unregister(int vcpuId)
    {
        _vcpus.Remove(vcpuId);
        CompleteSatisfied();
    }

    public void Ack(int vcpuId, ulong generation)
    {
        if (!_vcpus.TryGetValue(vcpuId, out var v)) return;
        v.Acked = Math.Max(v.Acked, Math.Min(generation, Generation));
        CompleteSatisfied();
    }

    /// <summary>Bumps the generation and tells every vcpu; returns the new generation.</summary>
    public ulong Invalidate(IActorRef self)
    {
        var g = ++Generation;
        foreach (var (_, v) in _vcpus) v.Actor.Tell(new VmspaceProtocol.InvalidateEpt(g), self);
        return g;
    }

    /// <summary>The vcpus <see cref="Invalidate"/> tells.</summary>
    public IReadOnlyList<int> VcpuIds => [.. _vcpus.Keys];

    public bool IsComplete(ulong generation) => _vcpus.Values.All(v => v.Acked >= generation);

    /// <summary>Runs <paramref name="complete"/> once every vcpu acked <paramref name="generation"/>
    /// (now, if they already have).</summary>
    public void WhenComplete(ulong generation, Action complete)
    {
        if (IsComplete(generation)) complete();
        else _waiting.Add((generation, complete));
    }

    private void CompleteSatisfied()
    {
        for (var i = 0; i < _waiting.Count;)
        {
            if (IsComplete(_waiting[i].Generation))
            {
                var done = _waiting[i].Complete;
                _waiting.RemoveAt(i);
                done();
            }
            else i++;
        }
    }
}
