using System.Diagnostics;
using ActorVmm.Bench;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using static Iced.Intel.AssemblerRegisters;

// Port-I/O exit cost: the same guests run by a raw LibVmm loop (no actors: the limit) and by
// ActorVmm (vcpu actor + device actor). Each I/O loop is paired with the same loop with the I/O
// replaced by a nop, so guest instruction time is subtracted: per-exit = (T_io - T_nop) / N.
const string usage = """
    usage: actorvmm-bench [io] [N] [repetitions]     port I/O exits (needs /dev/kvm)
           actorvmm-bench faults [pages] [repetitions] [host|guest|both]  nested page faults (userfaultfd): a host thread, a guest
           actorvmm-bench trace [N] [repetitions] [ring capacity]  what message tracing costs on a device round trip
           actorvmm-bench lapic [round trips] [timer ticks] [period µs] [repetitions] [all|raw,emulated,pool,assisted]  IPI ping-pong, LAPIC timer, IPI to a halted vcpu and TSC-deadline writes already passed (round trips each), timer EOIs (ticks); emulated vs assisted vs a raw loop
           actorvmm-bench ipipath [round trips] [repetitions] [bare|actors|pool|all|trace|alloc]  the host's share of an emulated IPI round trip (no KVM needed); trace: its messages; alloc: its allocations by type
           actorvmm-bench iopath [exits] [repetitions]  the host's share of a port I/O exit, devices inline vs on the thread pool (no KVM needed)
           actorvmm-bench blkpath [requests] [repetitions]  the host's share of a virtio-blk request (4 KiB and 512 KiB) vs a raw preadv/pwritev loop (no KVM needed)
           actorvmm-bench remotedev [operations] [repetitions]  COM1 reads and posted writes, beside the VM vs on another host node (two nodes in this process; no KVM needed)
           actorvmm-bench migrate [runs]     live migration of a 64 MiB guest rewriting 1 MiB / 32 MiB of its memory, two host nodes in this process, next to QEMU's (needs /dev/kvm)
           actorvmm-bench startup [runs]     process start to exit of `actorvmm run` and of QEMU for a trivial guest, and where ActorVmm's time goes
           actorvmm-bench hostmem [vms]      host memory per VM: idle 1-vcpu 16 MiB VMs in one host node, beyond guest RAM (needs /dev/kvm)
           actorvmm-bench linuxboot [runs] [cpus]  process start to the kernel's first line and to the init marker: the guest kit's Linux under ActorVmm and QEMU (needs /dev/kvm, guest/build.sh)
           actorvmm-bench blk [runs]         virtio-blk MB/s and 4 KiB IOPS from inside the guest kit's Linux under ActorVmm and QEMU (needs /dev/kvm, guest/build.sh)
           actorvmm-bench snapshot [runs]    snapshot latency and `run --restore` latency (lazy, eager) of a 128 MiB guest with 16 MiB touched (needs /dev/kvm)
    """;
if (args.Length > 0 && args[0] is "-h" or "--help" or "help")
{
    Console.WriteLine(usage);
    return 0;
}
// Count arguments: positive whole numbers, or the defaults when absent; anything else is refused.
var counts = new int?[args.Length];
for (var i = 0; i < args.Length; i++)
    counts[i] = int.TryParse(args[i], out var v) && v > 0 ? v : null;
var first = args.Length > 0 && args[0] is "faults" or "trace" or "lapic" or "ipipath" or "iopath" or "io" or "startup" or "snapshot" or "hostmem" or "linuxboot" or "blk" or "blkpath" or "remotedev" or "migrate" ? 1 : 0;
var last = args.Length > 0 && args[0] is "faults" or "ipipath" ? Math.Min(args.Length, 3)
    : args.Length > 0 && args[0] is "lapic" ? Math.Min(args.Length, 5) : args.Length; // what follows the counts is a mode
for (var i = first; i < last; i++)
    if (counts[i] is null)
    {
        Console.Error.WriteLine($"actorvmm-bench: '{args[i]}' is not a positive whole number");
        Console.Error.WriteLine(usage);
        return 2;
    }
int Count(int i, int fallback) => args.Length > i ? counts[i]!.Value : fallback;

if (args.Length > 0 && args[0] == "faults")
    return await ActorVmm.Bench.FaultBench.RunAsync(Count(1, 16_384), Count(2, 3), args.Length > 3 ? args[3] : "both");
if (args.Length > 0 && args[0] == "trace")
    return await ActorVmm.Bench.TraceBench.RunAsync(Count(1, 200_000), Count(2, 3), Count(3, 100_000));
if (args.Length > 0 && args[0] == "lapic")
    return await ActorVmm.Bench.LapicBench.RunAsync(Count(1, 2_000), Count(2, 500), Count(3, 1_000), Count(4, 3), args.Length > 5 ? args[5] : "all");
if (args.Length > 0 && args[0] == "startup")
    return await ActorVmm.Bench.StartupBench.RunAsync(Count(1, 10));
if (args.Length > 0 && args[0] == "hostmem")
    return await ActorVmm.Bench.HostMemoryBench.RunAsync(Count(1, 100));
if (args.Length > 0 && args[0] == "linuxboot")
    return await ActorVmm.Bench.LinuxBootBench.RunAsync(Count(1, 1), Count(2, 1));
if (args.Length > 0 && args[0] == "blk")
    return await ActorVmm.Bench.BlkBench.RunAsync(Count(1, 1));
if (args.Length > 0 && args[0] == "snapshot")
    return await ActorVmm.Bench.SnapshotBench.RunAsync(Count(1, 5));
if (args.Length > 0 && args[0] == "ipipath")
    return await ActorVmm.Bench.IpiPathBench.RunAsync(Count(1, 20_000), Count(2, 3), args.Length > 3 ? args[3] : "all");
if (args.Length > 0 && args[0] == "blkpath")
    return ActorVmm.Bench.BlkPathBench.Run(Count(1, 2_000), Count(2, 3));
if (args.Length > 0 && args[0] == "migrate")
    return await ActorVmm.Bench.MigrationBench.RunAsync(Count(1, 3));
if (args.Length > 0 && args[0] == "remotedev")
    return await ActorVmm.Bench.RemoteDeviceBench.RunAsync(Count(1, 20_000), Count(2, 3));
if (args.Length > 0 && args[0] == "iopath")
    return await ActorVmm.Bench.IoPathBench.RunAsync(Count(1, 200_000), Count(2, 3));
var at = args.Length > 0 && args[0] == "io" ? 1 : 0; // "io" may be named or not
var n = Count(at, 100_000);
var reps = Count(at + 1, 3);

if (!BenchGuest.KvmAvailable()) return 2;

const byte port = 0x10;

LongModeImage Guest(string kind) => BenchGuest.Long(a =>
{
    var loop = a.CreateLabel();
    a.mov(ecx, n);
    a.mov(al, 1);
    a.Label(ref loop);
    switch (kind)
    {
        case "out": a.@out(port, al); break;
        case "in": a.@in(al, port); break;
        default: a.nop(); a.nop(); break; // out/in imm8 are 2 bytes; two nops keep the loop's length
    }
    a.dec(ecx);
    a.jnz(loop);
    a.cli();
    a.hlt();
});

double Raw(LongModeImage image)
{
    using var vm = new RawVm(image, 16 << 20);
    var sw = Stopwatch.StartNew();
    vm.Run(run =>
    {
        if (!run.IoIsOut) run.IoData[0] = (byte)BenchDevice.Value;
        return true;
    });
    sw.Stop();
    return sw.Elapsed.TotalMilliseconds;
}

async Task<double> Actors(LongModeImage image)
{
    var system = HostRunner.CreateSystem(VmConfig.Load(null), "bench");
    try
    {
        using var console = SerialConsole.Captured();
        var builder = new VmBuilder(system, new VmSpec("bench", 16 << 20, 1, image))
            .WithStandardDevices(console)
            .AddDevice(new DeviceSpec("io", DeviceProtocol.Space.Port, port, 1, _ => new BenchDevice()));
        var sw = Stopwatch.StartNew();
        await using var vm = builder.Start();
        var outcome = await vm.Ended;
        sw.Stop();
        if (outcome.Kind != VmProtocol.OutcomeKind.Halted) throw new InvalidOperationException($"guest ended: {outcome}");
        return sw.Elapsed.TotalMilliseconds;
    }
    finally
    {
        await system.Terminate();
    }
}

async Task<double> Best(Func<Task<double>> measure)
{
    var best = double.MaxValue;
    for (var i = 0; i < reps; i++) best = Math.Min(best, await measure());
    return best;
}

HostRunner.ConfigureLogging();
Console.WriteLine($"port I/O exits: N = {n}, best of {reps}");
var guests = new Dictionary<string, LongModeImage> { ["out"] = Guest("out"), ["in"] = Guest("in"), ["nop"] = Guest("nop") };
var raw = new Dictionary<string, double>();
var actors = new Dictionary<string, double>();
foreach (var kind in new[] { "nop", "out", "in" })
{
    raw[kind] = await Best(() => Task.FromResult(Raw(guests[kind])));
    actors[kind] = await Best(() => Actors(guests[kind]));
}
Console.WriteLine($"{"",-8}{"raw ms",10}{"actor ms",10}{"raw µs/exit",14}{"actor µs/exit",15}{"ratio b/a",11}");
foreach (var kind in new[] { "out", "in" })
{
    var rawPer = (raw[kind] - raw["nop"]) * 1000 / n;
    var actorPer = (actors[kind] - actors["nop"]) * 1000 / n;
    Console.WriteLine($"{kind,-8}{raw[kind],10:F1}{actors[kind],10:F1}{rawPer,14:F3}{actorPer,15:F3}{actorPer / rawPer,11:F2}");
}
Console.WriteLine($"{"nop",-8}{raw["nop"],10:F1}{actors["nop"],10:F1}");
Console.WriteLine("goal: out <= 1.05x, in <= 1.20x the raw loop's per-exit time");
return 0;

