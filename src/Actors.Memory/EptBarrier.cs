using Akka.Actor;

namespace ActorVmm.Memory;

/// <summary>
/// The seed's <c>pmap_invalidate_ept()</c>: a generation number per vmspace and the vcpus that must
/// acknowledge it. A change running vcpus must see bumps the generation and sends
/// <see cref="VmspaceProtocol.InvalidateEpt"/> to every running vcpu; the change is complete once
/// every registered vcpu that is running has acked that generation (or a later one). Paused or
/// halted vcpus ack at once: they will see the new state when they next enter the guest.
/// Kicking a vcpu spinning in the guest is the vcpu side's job (its mailbox kicks on this message).
/// </summary>
internal sealed class EptBarrier
{
    private sealed class Vcpu(IActorRef actor, bool running, ulong acked)
    {
        public IActorRef Actor { get; set; } = actor;
        public bool Running { get; set; } = running;
        public ulong Acked { get; set; } = acked;
    }

    private readonly Dictionary<int, Vcpu> _vcpus = [];
    private readonly List<(ulong Generation, Action Complete)> _waiting = [];

    public ulong Generation { get; private set; }
    public int Registered => _vcpus.Count;
    public int Waiting => _waiting.Count;

    /// <summary>A vcpu joins; it has nothing stale (it will enter with the current state).</summary>
    public void Register(int vcpuId, IActorRef vcpu, bool running)
    {
        _vcpus[vcpuId] = new Vcpu(vcpu, running, Generation);
        CompleteSatisfied();
    }

    public void Unregister(int vcpuId)
    {
        _vcpus.Remove(vcpuId);
        CompleteSatisfied();
    }

    /// <summary>Running --Pause/Halt--> not running: acks everything so far at once.</summary>
    public void SetRunning(int vcpuId, bool running)
    {
        if (!_vcpus.TryGetValue(vcpuId, out var v)) return;
        v.Running = running;
        if (!running) v.Acked = Generation;
        CompleteSatisfied();
    }

    public void Ack(int vcpuId, ulong generation)
    {
        if (!_vcpus.TryGetValue(vcpuId, out var v)) return;
        v.Acked = Math.Max(v.Acked, Math.Min(generation, Generation));
        CompleteSatisfied();
    }

    /// <summary>Bumps the generation and tells every running vcpu; returns the new generation.</summary>
    public ulong Invalidate(IActorRef self)
    {
        var g = ++Generation;
        foreach (var (_, v) in _vcpus)
        {
            if (v.Running) v.Actor.Tell(new VmspaceProtocol.InvalidateEpt(g), self);
            else v.Acked = g;
        }
        return g;
    }

    /// <summary>The vcpus <see cref="Invalidate"/> tells (the running ones).</summary>
    public IReadOnlyList<int> RunningVcpus => [.. _vcpus.Where(v => v.Value.Running).Select(v => v.Key)];

    public bool IsComplete(ulong generation) => _vcpus.Values.All(v => !v.Running || v.Acked >= generation);

    /// <summary>Runs <paramref name="complete"/> once every running vcpu acked <paramref name="generation"/>
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
