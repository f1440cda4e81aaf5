using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Runs one small guest on real KVM with the standard devices (+ extra ones) and collects what it
/// did: its outcome, its serial output, its memory (readable until disposal) and its trace.
/// </summary>
public sealed class GuestRun : IAsyncDisposable
{
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(20);

    private readonly ActorSystem _system;
    private readonly SerialConsole _console;

    public RunningVm Vm { get; }
    public VmProtocol.Outcome Outcome { get; private set; } = null!;
    public TraceRecorder Trace { get; }
    public string Serial => _console.CapturedText();

    private GuestRun(ActorSystem system, SerialConsole console, RunningVm vm, TraceRecorder trace)
    {
        _system = system;
        _console = console;
        Vm = vm;
        Trace = trace;
    }

    public static Task<GuestRun> RunAsync(BootImage boot, ulong memory = 16 << 20, int cpus = 1,
        TimeSpan? timeout = null, params DeviceSpec[] devices) => RunAsync(boot, memory, cpus, timeout, null, devices);

    public static Task<GuestRun> RunAsync(BootImage boot, ulong memory, int cpus, TimeSpan? timeout,
        ActorVmm.Memory.VmspaceOptions? paging, params DeviceSpec[] devices) =>
        RunAsync(boot, memory, cpus, timeout, paging, LapicMode.Emulated, devices);

    /// <summary>Runs a guest with the local APICs of <paramref name="lapic"/> (emulated or KVM-assisted).</summary>
    public static async Task<GuestRun> RunAsync(BootImage boot, ulong memory, int cpus, TimeSpan? timeout,
        ActorVmm.Memory.VmspaceOptions? paging, LapicMode lapic, params DeviceSpec[] devices)
    {
        var run = await StartAsync(new VmSpec("guest", memory, cpus, boot, Lapic: lapic, Paging: paging), devices);
        await run.EndAsync(timeout);
        return run;
    }

    /// <summary>Starts a guest and returns while it runs (a test talks to it, then <see cref="EndAsync"/>).</summary>
    public static async Task<GuestRun> StartAsync(VmSpec spec, params DeviceSpec[] devices)
    {
        KvmRequirement.Check();
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        var console = SerialConsole.Captured();
        var trace = new TraceRecorder();
        var builder = new VmBuilder(system, spec).WithStandardDevices(console).WithTrace(trace);
        foreach (var d in devices) builder.AddDevice(d);
        RunningVm vm;
        try
        {
            vm = builder.Start();
        }
        catch
        {
            console.Dispose();
            await system.Terminate();
            throw;
        }
        return new GuestRun(system, console, vm, trace);
    }

    /// <summary>Waits for the guest to end (stopping it after the timeout) and records its outcome.</summary>
    public async Task<VmProtocol.Outcome> EndAsync(TimeSpan? timeout = null)
    {
        Outcome = await Vm.WaitAsync(timeout ?? DefaultTimeout);
        _console.Flush();
        return Outcome;
    }

    /// <summary>Asks one of the VM's actors and waits for the answer.</summary>
    public async Task<T> AskChild<T>(string name, object message)
    {
        var actor = await ResolveChild(name);
        return await actor.Ask<T>(message, TimeSpan.FromSeconds(30));
    }

    /// <summary>One of the VM's actors (the VM actor stays alive until disposal).</summary>
    public Task<IActorRef> ResolveChild(string name) =>
        _system.ActorSelection(Vm.Actor.Path / name).ResolveOne(TimeSpan.FromSeconds(5));

    public async ValueTask DisposeAsync()
    {
        await Vm.DisposeAsync();
        _console.Dispose();
        await _system.Terminate();
    }
}

/// <summary>A test device that counts writes and remembers the last value.</summary>
public sealed class CountingDevice : IBusDevice
{
    private long _writes;
    private long _sum;
    public long Writes => Interlocked.Read(ref _writes);
    public long Sum => Interlocked.Read(ref _sum);
    public ulong Read(ulong offset, int size) => (ulong)Writes;
    public void Write(ulong offset, int size, ulong value)
    {
        Interlocked.Increment(ref _writes);
        Interlocked.Add(ref _sum, (long)value);
    }
}

/// <summary>A test device whose reads return base + n for the n-th read, and that stores writes
/// per offset (a register file), so a guest can read back what it wrote.</summary>
public sealed class RegisterDevice(ulong readBase) : IBusDevice
{
    private readonly Dictionary<ulong, ulong> _registers = new();
    private ulong _reads;
    public IReadOnlyDictionary<ulong, ulong> Registers { get { lock (_registers) return new Dictionary<ulong, ulong>(_registers); } }

    public ulong Read(ulong offset, int size)
    {
        lock (_registers)
            return _registers.TryGetValue(offset, out var v) ? v : readBase + _reads++;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        lock (_registers) _registers[offset] = value;
    }
}
