using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Bench;

/// <summary>
/// The host's share of a port I/O exit, measurable without /dev/kvm: the `io` bench's guests with
/// an <see cref="IoVcpu"/> in place of KVM, whose every run returns at once the next exit (N reads or
/// writes of one byte at the bench device's port, then the debug exit). The time per exit is the
/// VMM's alone: what the exit costs in KVM is not in it. Three ways of handling the same exits:
/// <list type="bullet">
/// <item><b>bare</b>: one loop on one thread calling the device model: the least any VMM costs.</item>
/// <item><b>inline</b>: the VM actor with its vcpu and device actors as configured (devices on
/// their senders' threads, <see cref="DeviceProtocol.DispatcherId"/>).</item>
/// <item><b>pool</b>: the same with the devices on the thread pool (a read crosses to a pool thread
/// and back).</item>
/// </list>
/// On a real KVM an exit itself costs some µs (the raw loop of the `io` bench), so the ratio the
/// `io` bench prints there is (that + this share) / that.
/// </summary>
internal static class IoPathBench
{
    public const byte Port = 0x10;

    public static async Task<int> RunAsync(int exits, int reps)
    {
        HostRunner.ConfigureLogging();
        var pool = Akka.Configuration.ConfigurationFactory.ParseString("actorvmm.device-dispatcher.type = Dispatcher")
            .WithFallback(VmConfig.Load(null));
        Console.WriteLine($"port I/O exit, the host's share (no KVM: a vcpu that exits at once): {exits} exits, best of {reps}");
        Console.WriteLine($"{"",-8}{"bare µs",10}{"inline µs",11}{"pool µs",10}{"inline B/exit",15}{"pool B/exit",13}");
        foreach (var isOut in new[] { true, false })
        {
            double bare = double.MaxValue;
            (double Us, double Bytes) inline = (double.MaxValue, 0), onPool = (double.MaxValue, 0);
            for (var i = 0; i < reps; i++)
            {
                bare = Math.Min(bare, Bare(exits, isOut));
                var a = await Actors(exits, isOut, VmConfig.Load(null));
                if (a.Us < inline.Us) inline = a;
            }
            // Last: the pool's threads stay awake a while after a run and would take a core from the next.
            for (var i = 0; i < reps; i++)
            {
                var p = await Actors(exits, isOut, pool);
                if (p.Us < onPool.Us) onPool = p;
            }
            Console.WriteLine($"{(isOut ? "out" : "in"),-8}{bare,10:F3}{inline.Us,11:F3}{onPool.Us,10:F3}{inline.Bytes,15:F0}{onPool.Bytes,13:F0}");
        }
        Console.WriteLine("(µs per exit of the VMM's own work; add KVM's exit cost for the whole exit)");
        return 0;
    }

    private static double Bare(int exits, bool isOut)
    {
        var device = new BenchDevice();
        ulong sum = 0;
        var start = Stopwatch.GetTimestamp();
        for (var i = 0; i < exits; i++)
        {
            if (isOut) device.Write(0, 1, (ulong)i);
            else sum += device.Read(0, 1);
        }
        var us = Stopwatch.GetElapsedTime(start).TotalMicroseconds / exits;
        GC.KeepAlive(sum);
        return us;
    }

    private static async Task<(double Us, double Bytes)> Actors(int exits, bool isOut, Akka.Configuration.Config config)
    {
        var system = HostRunner.CreateSystem(config, "bench");
        try
        {
            using var console = SerialConsole.Captured();
            using var memory = VmspaceLayout.Build(4 << 20);
            var vcpu = new IoVcpu(exits, isOut);
            var devices = new List<DeviceSpec>
            {
                PcPlatform.DebugExit(),
                new("io", DeviceProtocol.Space.Port, Port, 1, _ => new BenchDevice()),
            };
            var resources = new VmResources("iopath", memory, [vcpu], devices, Traced: false, new MonotonicClock());
            var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
            var vm = system.ActorOf(Props.Create(() => new VmActor(resources, ended)), "iopath");
            var allocated = GC.GetTotalAllocatedBytes();
            vm.Tell(VmProtocol.Start.Instance);
            var outcome = await ended.Task.WaitAsync(TimeSpan.FromMinutes(5));
            var bytes = (GC.GetTotalAllocatedBytes() - allocated) / (double)exits;
            if (outcome is not { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 })
                throw new InvalidOperationException($"iopath VM ended: {outcome}");
            if (!isOut && vcpu.Sum != (ulong)exits * BenchDevice.Value)
                throw new InvalidOperationException($"iopath: the reads returned {vcpu.Sum}, not {exits} x 0x{BenchDevice.Value:X}");
            return (Stopwatch.GetElapsedTime(vcpu.Start, vcpu.End).TotalMicroseconds / exits, bytes);
        }
        finally
        {
            await system.Terminate();
        }
    }
}

/// <summary>Takes writes, answers reads with <see cref="Value"/>.</summary>
internal sealed class BenchDevice : IBusDevice
{
    public const ulong Value = 0x42;
    public ulong Read(ulong offset, int size) => Value;
    public void Write(ulong offset, int size, ulong value) { }
}

/// <summary>
/// A vcpu without KVM for <see cref="IoPathBench"/>: each <see cref="Run"/> returns at once the next
/// of <c>exits</c> one-byte IN or OUT exits at <see cref="IoPathBench.Port"/>, then an OUT of 0 to the
/// debug-exit port. It sums what the reads returned and times the exits from the first to the last.
/// </summary>
internal sealed class IoVcpu(int exits, bool isOut) : IVcpu
{
    private int _done;
    private int _immediateExit;
    private int _boundThread;
    private KvmRegs _regs;
    private KvmSregs _sregs;

    public int Id => 0;
    public long Start, End;
    public ulong Sum;

    public VmExit Run()
    {
        if (Interlocked.Exchange(ref _immediateExit, 0) != 0) return VmExit.Intr.Instance;
        if (_done == 0) Start = Stopwatch.GetTimestamp();
        if (_done == exits)
        {
            End = Stopwatch.GetTimestamp();
            return new VmExit.Io(IsOut: true, BenchGuest.DebugExitPort, 1, 1, 0, null);
        }
        _done++;
        return new VmExit.Io(isOut, IoPathBench.Port, 1, 1, 1, null);
    }

    public void CompleteIoIn(int index, ulong value) => Sum += value;
    public void CompleteMmioRead(ulong value) { }
    public void CompleteMsrRead(ulong value, bool fault) { }
    public void CompleteMsrWrite(bool fault) { }
    public KvmRegs GetRegisters() => _regs;
    public void SetRegisters(in KvmRegs regs) => _regs = regs;
    public KvmSregs GetSpecialRegisters() => _sregs;
    public void SetSpecialRegisters(in KvmSregs sregs) => _sregs = sregs;
    public bool InterruptsEnabled => false;
    public bool ReadyForInterruptInjection => false;
    public bool RequestInterruptWindow { set { } }
    public void InjectInterrupt(byte vector) { }
    public void InjectNmi() { }

    public bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical)
    {
        physical = default;
        return false;
    }

    public void BindToCurrentThread() => _boundThread = Environment.CurrentManagedThreadId;

    public void Kick()
    {
        if (_boundThread != Environment.CurrentManagedThreadId) Volatile.Write(ref _immediateExit, 1);
    }

    public void Dispose() { }
}
