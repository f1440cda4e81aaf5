using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Host.Tracing;
using ActorVmm.Devices.Tracing;

namespace ActorVmm.Bench;

/// <summary>
/// The host's share of an emulated IPI round trip, measurable without /dev/kvm: the `lapic` bench's
/// ping-pong with <see cref="PingPongVcpu"/>s in place of KVM. They exit at once with the exits the
/// real guest makes (vcpu 0: xAPIC ICR writes, HLT, the handler's EOI; vcpu 1: x2APIC EOI and ICR
/// WRMSRs, HLT), so the time per round trip is the VMM's alone: what the exits cost in KVM is not
/// in it. Two VMMs handle the same exits (the second in two configurations):
/// <list type="bullet">
/// <item><b>bare</b>: <see cref="BareApicLoop"/>, one loop per vcpu thread calling the
/// <see cref="LocalApic"/> models directly: the least a user-space local APIC can cost.</item>
/// <item><b>actors</b>: the VM actor with its vcpu, vlapic and device actors, as configured; and
/// <b>pool</b>: the same with the vlapics on the thread pool.</item>
/// </list>
/// </summary>
internal static class IpiPathBench
{
    public static async Task<int> RunAsync(int roundTrips, int reps, string only)
    {
        if (only is not ("all" or "bare" or "actors" or "pool" or "trace" or "alloc"))
        {
            Console.Error.WriteLine($"ipipath: the variant is bare, actors, pool, all, trace or alloc, not \"{only}\"");
            return 2;
        }
        HostRunner.ConfigureLogging();
        if (only == "trace") return await TraceAsync(roundTrips);
        if (only == "alloc") return await AllocationsAsync(roundTrips);
        var pool = Akka.Configuration.ConfigurationFactory.ParseString("actorvmm.vlapic-dispatcher.type = Dispatcher")
            .WithFallback(VmConfig.Load(null));
        PingPongScore? bare = null, actors = null, actorsPool = null;
        for (var i = 0; i < reps; i++)
        {
            if (only is "all" or "bare") bare = PingPongScore.Best(bare, Bare(roundTrips));
            if (only is "all" or "actors") actors = PingPongScore.Best(actors, await Actors(roundTrips, VmConfig.Load(null)));
        }
        // Last: the pool's threads stay awake a while after a run and would take a core from the next.
        if (only is "all" or "pool")
            for (var i = 0; i < reps; i++)
                actorsPool = PingPongScore.Best(actorsPool, await Actors(roundTrips, pool));
        Console.WriteLine($"IPI round trip, the host's share (no KVM: vcpus that exit at once): {roundTrips} round trips, best of {reps}");
        Console.WriteLine($"{"",-40}{"µs/round trip",15}{"median",8}{"p99",8}{"ratio",8}");
        foreach (var (name, score) in new[]
                 {
                     ("bare loop (LocalApic models, no actors)", bare), ("actors", actors),
                     ("actors, vlapics on the thread pool", actorsPool),
                 })
            if (score is not null)
                Console.WriteLine($"{name,-40}{score.PerRoundTripMicroseconds,15:F2}{score.Percentile(0.5),8:F1}{score.Percentile(0.99),8:F1}" +
                                  (bare is null ? "" : $"{score.PerRoundTripMicroseconds / bare.PerRoundTripMicroseconds,8:F2}"));
        foreach (var (name, score) in new[] { ("actors", actors), ("actors, vlapics on the thread pool", actorsPool) })
            if (score is not null)
                Console.WriteLine($"{name}: {score.Exits[0] / (double)roundTrips:F2} + {score.Exits[1] / (double)roundTrips:F2} exits, " +
                                  $"{score.Signals[0] / (double)roundTrips:F2} + {score.Signals[1] / (double)roundTrips:F2} kick signals, " +
                                  $"{score.AllocatedBytes / (double)roundTrips:F0} bytes allocated per round trip");
        return 0;
    }

    /// <summary>
    /// The messages of a round trip: the ping-pong once under the actors with the message trace on
    /// (which costs time: nothing is timed), then each kind of message (sender, receiver, type)
    /// with how many times it was sent per round trip. The guest's exits are trace events too.
    /// </summary>
    private static async Task<int> TraceAsync(int roundTrips)
    {
        await using var recorder = new TraceRecorder(capacity: Math.Max(100_000, roundTrips * 40));
        await Actors(roundTrips, VmConfig.Load(null), recorder);
        var events = recorder.Snapshot();
        if (recorder.Count > events.Count)
            Console.WriteLine($"(the ring kept the latest {events.Count} of {recorder.Count} events: start-up is left out)");
        Console.WriteLine($"IPI round trip under the actors, traced: {roundTrips} round trips; messages per round trip");
        foreach (var k in TraceRecorder.CountByKind(events).Where(k => k.Count >= roundTrips / 100.0))
            Console.WriteLine($"{k.Count / (double)roundTrips,8:F2}  {k.Sender} -> {k.Receiver}: {k.Type}");
        return 0;
    }

    /// <summary>
    /// What a round trip allocates under the actors, by type (sampled: <see cref="AllocationSampler"/>),
    /// after a warm-up run. The stand-in vcpus' own exit records are among them (VmExit.Mmio,
    /// VmExit.MsrWrite, VmExit[]): KVM's vcpus allocate their exits too, but not the arrays.
    /// </summary>
    private static async Task<int> AllocationsAsync(int roundTrips)
    {
        await Actors(Math.Max(1, roundTrips / 4), VmConfig.Load(null));
        using var sampler = new AllocationSampler();
        var score = await Actors(roundTrips, VmConfig.Load(null));
        Console.WriteLine($"IPI round trip under the actors: {score.AllocatedBytes / (double)roundTrips:F0} bytes allocated per round trip; " +
                          "by type (sampled, bytes per round trip):");
        foreach (var (type, bytes) in sampler.Bytes.OrderByDescending(kv => kv.Value).TakeWhile(kv => kv.Value >= roundTrips))
            Console.WriteLine($"{bytes / (double)roundTrips,8:F0}  {type}");
        return 0;
    }

    /// <summary>The ping-pong under ActorVmm's actors (traced into <paramref name="trace"/> if given).</summary>
    private static async Task<PingPongScore> Actors(int roundTrips, Akka.Configuration.Config config, TraceRecorder? trace = null)
    {
        var system = HostRunner.CreateSystem(config, "bench");
        try
        {
            using var console = SerialConsole.Captured();
            using var memory = VmspaceLayout.Build(4 << 20);
            var score = new PingPongScore(roundTrips);
            IVcpu[] vcpus = [new PingPongVcpu(0, score), new PingPongVcpu(1, score)];
            var clock = new MonotonicClock();
            var devices = new List<DeviceSpec> { PcPlatform.Com1(console.Write), PcPlatform.DebugExit() };
            devices.AddRange(PcPlatform.InterruptControllersAndTimers(2, biosLikePic: true));
            using var registration = trace is not null ? MessageTraceRegistry.Register(system, "/user/ipipath", trace) : null;
            var resources = new VmResources("ipipath", memory, vcpus, devices, Traced: trace is not null, clock,
                LapicBackends.Emulated(new LapicOptions { BspLint0ExtInt = true }));
            var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
            var vm = system.ActorOf(Props.Create(() => new VmActor(resources, ended)), "ipipath");
            var allocated = GC.GetTotalAllocatedBytes();
            vm.Tell(VmProtocol.Start.Instance);
            var outcome = await ended.Task.WaitAsync(TimeSpan.FromMinutes(5));
            score.AllocatedBytes = GC.GetTotalAllocatedBytes() - allocated;
            if (outcome is not { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 })
                throw new InvalidOperationException($"ipipath VM ended: {outcome}");
            foreach (var v in vcpus) v.Dispose();
            return score;
        }
        finally
        {
            await system.Terminate();
        }
    }

    /// <summary>The ping-pong under the bare loop: one thread per vcpu, no actors.</summary>
    private static PingPongScore Bare(int roundTrips)
    {
        var score = new PingPongScore(roundTrips);
        PingPongVcpu[] vcpus = [new PingPongVcpu(0, score), new PingPongVcpu(1, score)];
        new BareApicLoop(vcpus).Run(TimeSpan.FromMinutes(1), id => vcpus[id].State);
        return score;
    }
}

/// <summary>What the two <see cref="PingPongVcpu"/>s of one run share: the AP's "ready", the round
/// trips, the time of the first ping and of the last pong, and each round trip's time (ping to
/// ping), whose median and tail tell a slow path from a thread that lost its core.</summary>
internal sealed class PingPongScore(int roundTrips)
{
    public int RoundTrips { get; } = roundTrips;
    public volatile bool ApReady;
    public long Start;
    public long End;
    public long LastPing;
    public readonly long[] Trips = new long[roundTrips];
    public readonly long[] Exits = new long[2];
    public readonly long[] Signals = new long[2];
    public long AllocatedBytes;

    public double PerRoundTripMicroseconds =>
        End == 0 ? throw new InvalidOperationException("the ping-pong did not finish") : Stopwatch.GetElapsedTime(Start, End).TotalMicroseconds / RoundTrips;

    /// <summary>A round trip's time at quantile <paramref name="q"/>, in µs (the first one has no
    /// ping before it and is left out).</summary>
    public double Percentile(double q)
    {
        if (_sorted is null)
        {
            _sorted = Trips.AsSpan(1).ToArray();
            Array.Sort(_sorted);
        }
        return Stopwatch.GetElapsedTime(0, _sorted[(int)(q * (_sorted.Length - 1))]).TotalMicroseconds;
    }

    private long[]? _sorted;

    public static PingPongScore Best(PingPongScore? a, PingPongScore b) =>
        a is null || b.PerRoundTripMicroseconds < a.PerRoundTripMicroseconds ? b : a;
}

/// <summary>
/// A vcpu of the IPI ping-pong guest without KVM: <see cref="Run"/> returns at once the exit the
/// `lapic` bench's guest would make next. vcpu 0 (the BSP, xAPIC) enables its APIC, starts vcpu 1
/// with INIT-SIPI, waits (running, no exits) until vcpu 1 is ready, then sends vector 0x41 to APIC 1
/// (ICR high, ICR low) and halts until its handler for 0x40 (EOI) has counted the pong; after the
/// last one it writes the debug-exit port. vcpu 1 (after the SIPI) turns on x2APIC (RDMSR, WRMSR
/// IA32_APIC_BASE), writes its SVR, and halts; its handler for 0x41 writes EOI and sends 0x40 to
/// APIC 0 through the x2APIC ICR. As in the guest, interrupts are open only in HLT (sti; hlt), and an
/// interrupt queued with <see cref="InjectInterrupt"/> is taken at the next entry. Kicks follow
/// <see cref="VcpuHandle"/>: immediate_exit, and a signal (counted) only to a vcpu in or entering a run.
/// </summary>
internal sealed class PingPongVcpu(int id, PingPongScore score) : IVcpu
{
    private const ulong Apic = LocalApic.DefaultBaseAddress;
    private const uint PingVector = 0x41, PongVector = 0x40;
    private readonly List<VmExit> _next = [];
    private int _immediateExit;
    private int _inRun;
    private int _boundThread;
    private byte? _injected;
    private bool _halted;
    private bool _booted;
    private int _sent, _received;
    private KvmRegs _regs;
    private KvmSregs _sregs;

    public int Id { get; } = id;

    /// <summary>Where the guest is, for a diagnosis of a run that did not end.</summary>
    public string State => $"booted {_booted}, sent {_sent}, received {_received}, halted {_halted}, {_next.Count} exits queued";

    public VmExit Run()
    {
        if (Volatile.Read(ref _inRun) == 0) Interlocked.Exchange(ref _inRun, 1);
        try
        {
            if (Interlocked.Exchange(ref _immediateExit, 0) != 0) return VmExit.Intr.Instance;
            if (_injected is { } vector)
            {
                _injected = null;
                TakeInterrupt(vector);
            }
            if (_next.Count == 0 && !Continue()) return VmExit.Intr.Instance;
            var exit = _next[0];
            _next.RemoveAt(0);
            if (Id == 0 && exit is VmExit.Mmio { Value: PingVector })
            {
                var now = Stopwatch.GetTimestamp();
                if (score.LastPing != 0) score.Trips[_sent - 1] = now - score.LastPing;
                score.LastPing = now;
            }
            _halted = exit is VmExit.Hlt;
            score.Exits[Id]++;
            return exit;
        }
        finally
        {
            Volatile.Write(ref _inRun, 0);
        }
    }

    /// <summary>The guest's straight-line code after the last exit; false when a kick ended a wait
    /// that makes no exit (vcpu 0 spinning for the AP).</summary>
    private bool Continue()
    {
        if (!_booted)
        {
            _booted = true;
            if (Id == 0)
                Queue(MmioWrite(ApicOffsets.Svr, 0x1FF), MmioWrite(ApicOffsets.IcrHigh, 1u << 24),
                    MmioWrite(ApicOffsets.IcrLow, 0x4500), MmioWrite(ApicOffsets.IcrLow, 0x4609));
            else
                Queue(new VmExit.MsrRead(ApicMsrs.ApicBase, 0)); // its completion queues the rest
            return true;
        }
        if (Id == 1)
        {
            score.ApReady = true;
            Queue(VmExit.Hlt.Instance);
            return true;
        }
        if (_sent == 0)
        {
            while (!score.ApReady)
            {
                if (Volatile.Read(ref _immediateExit) != 0) return false;
                Thread.SpinWait(20);
            }
            score.Start = Stopwatch.GetTimestamp();
        }
        if (_received < _sent) Queue(VmExit.Hlt.Instance);
        else if (_sent < score.RoundTrips)
        {
            _sent++;
            Queue(MmioWrite(ApicOffsets.IcrHigh, 1u << 24), MmioWrite(ApicOffsets.IcrLow, PingVector));
        }
        else
        {
            score.End = Stopwatch.GetTimestamp();
            Queue(new VmExit.Io(IsOut: true, BenchGuest.DebugExitPort, 1, 1, 0, null));
        }
        return true;
    }

    /// <summary>The handler runs before what was left of the interrupted code.</summary>
    private void TakeInterrupt(byte vector)
    {
        _halted = false;
        if (Id == 0 && vector == PongVector)
        {
            _received++;
            _next.Insert(0, MmioWrite(ApicOffsets.Eoi, 0));
        }
        else if (Id == 1 && vector == PingVector)
        {
            _next.Insert(0, new VmExit.MsrWrite(0x830, PongVector, 0));
            _next.Insert(0, new VmExit.MsrWrite(0x80B, 0, 0));
        }
        else throw new InvalidOperationException($"vcpu {Id} got unexpected vector {vector:x2}");
    }

    private void Queue(VmExit exit) => _next.Add(exit);

    private void Queue(VmExit first, VmExit second)
    {
        _next.Add(first);
        _next.Add(second);
    }

    private void Queue(params VmExit[] exits) => _next.AddRange(exits);

    private static VmExit.Mmio MmioWrite(int offset, uint value) => new(Apic + (ulong)offset, IsWrite: true, 4, value);

    public void CompleteIoIn(int index, ulong value) { }

    public void CompleteMmioRead(ulong value) { }

    public void CompleteMsrRead(ulong value, bool fault)
    {
        if (fault) throw new InvalidOperationException("RDMSR IA32_APIC_BASE faulted");
        Queue(new VmExit.MsrWrite(ApicMsrs.ApicBase, value | 0xC00, 0), new VmExit.MsrWrite(0x80F, 0x1FF, 0));
    }

    public void CompleteMsrWrite(bool fault)
    {
        if (fault) throw new InvalidOperationException($"vcpu {Id}: a WRMSR faulted");
    }

    public KvmRegs GetRegisters() => _regs;
    public void SetRegisters(in KvmRegs regs) => _regs = regs;
    public KvmSregs GetSpecialRegisters() => _sregs;
    public void SetSpecialRegisters(in KvmSregs sregs) => _sregs = sregs;

    /// <summary>sti; hlt: interrupts are open only while the guest sleeps.</summary>
    public bool InterruptsEnabled => _halted;
    public bool ReadyForInterruptInjection => _halted && _injected is null;
    public bool RequestInterruptWindow { set { } }

    public void InjectInterrupt(byte vector) => _injected = vector;

    public void InjectNmi() => throw new InvalidOperationException("the ping-pong sends no NMI");

    /// <summary>KVM's copy of IA32_APIC_BASE (its CPUID bit): nothing to keep here.</summary>
    public void SetMsrs(params KvmMsrEntry[] msrs) { }

    public bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical)
    {
        physical = default;
        return false;
    }

    public void BindToCurrentThread() => _boundThread = Environment.CurrentManagedThreadId;

    public void Kick()
    {
        if (_boundThread == Environment.CurrentManagedThreadId) return;
        Volatile.Write(ref _immediateExit, 1);
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _inRun) == 0) return;
        Interlocked.Increment(ref score.Signals[Id]);
    }

    public void PrepareToRun()
    {
        Volatile.Write(ref _immediateExit, 0);
        Interlocked.Exchange(ref _inRun, 1);
    }

    public void CancelRun() => Volatile.Write(ref _inRun, 0);

    public void Dispose() { }
}
