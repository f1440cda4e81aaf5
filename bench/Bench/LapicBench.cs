using Akka.Configuration;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Devices;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// Local APIC costs under both backends (lapic = emulated | assisted), the same guests in one run:
/// <list type="bullet">
/// <item>IPI ping-pong: vcpu 0 (64-bit, xAPIC MMIO) sends vector 0x41 to vcpu 1 and sleeps until
/// vcpu 1 (real mode, x2APIC MSRs) answers with vector 0x40 from its handler; N round trips.</item>
/// <item>Timer: vcpu 0's LAPIC timer in periodic mode with a given period; the guest sleeps in HLT
/// until it has taken K interrupts. Reports interrupts per second against the programmed rate.</item>
/// </list>
/// The guest marks the start and end of the measured part with writes to port 0x10; the host takes
/// the time of each when the marker device handles it (the same device path in both modes).
/// The ping-pong also runs in a VM built with LibVmm only, under <see cref="BareApicLoop"/> (the
/// same exits, no actors): what any user-space local APIC costs on this host, against which both
/// the goal and the actors' share can be judged.
/// </summary>
internal static class LapicBench
{
    private const ulong Counter = 0x9F900;
    private const ulong Trampoline = 0x9000;     // SIPI vector 0x09
    private const ushort ApReady = 0x8F08;
    private const long LapicBase = InterruptCode.LapicBase;

    /// <summary>A backend, and where the vlapic actors run: on their senders' threads (the
    /// default, actorvmm.vlapic-dispatcher) or on the thread pool (for comparison).</summary>
    private sealed record Variant(string Name, LapicMode Mode, bool OnPool)
    {
        public Akka.Configuration.Config Config => OnPool
            ? ConfigurationFactory.ParseString("actorvmm.vlapic-dispatcher.type = Dispatcher").WithFallback(VmConfig.Load(null))
            : VmConfig.Load(null);
    }

    public static async Task<int> RunAsync(int roundTrips, int ticks, int periodMicroseconds, int reps)
    {
        if (!BenchGuest.KvmAvailable()) return 2;
        HostRunner.ConfigureLogging();
        Variant[] variants =
        [
            new("emulated", LapicMode.Emulated, OnPool: false),
            new("emulated, vlapics on the thread pool", LapicMode.Emulated, OnPool: true),
            new("assisted", LapicMode.Assisted, OnPool: false),
        ];
        var pingPong = PingPong(roundTrips);
        var timer = Timer(ticks, periodMicroseconds);
        var ipi = new Dictionary<Variant, double>();
        var rate = new Dictionary<Variant, double>();
        var raw = double.MaxValue;
        for (var i = 0; i < reps; i++) raw = Math.Min(raw, RawPingPong(pingPong));
        foreach (var variant in variants)
        {
            ipi[variant] = double.MaxValue;
            rate[variant] = 0;
            for (var i = 0; i < reps; i++)
            {
                ipi[variant] = Math.Min(ipi[variant], await Measure(pingPong, 2, variant));
                rate[variant] = Math.Max(rate[variant], ticks / (await Measure(timer, 1, variant) / 1000));
            }
        }
        Console.WriteLine($"local APIC: {roundTrips} IPI round trips between 2 vcpus; {ticks} periodic timer interrupts " +
                          $"every {periodMicroseconds} µs ({1e6 / periodMicroseconds:F0}/s programmed); best of {reps}");
        Console.WriteLine($"{"",-38}{"µs/round trip",15}{"timer irq/s",13}");
        Console.WriteLine($"{"raw loop, LocalApic models, no actors",-38}{raw * 1000 / roundTrips,15:F2}{"-",13}");
        foreach (var variant in variants)
            Console.WriteLine($"{variant.Name,-38}{ipi[variant] * 1000 / roundTrips,15:F2}{rate[variant],13:F0}");
        var assisted = ipi[variants[2]];
        Console.WriteLine($"IPI round trip, emulated / assisted: {ipi[variants[0]] / assisted:F2}   goal: <= 2" +
                          $"   (vlapics on the thread pool: {ipi[variants[1]] / assisted:F2})");
        Console.WriteLine($"  raw loop / assisted: {raw / assisted:F2} (the least a user-space local APIC costs on this host)" +
                          $"   emulated / raw loop: {ipi[variants[0]] / raw:F2} (what the actors add)");
        return 0;
    }

    /// <summary>
    /// The ping-pong guest in a VM built with LibVmm only, its two vcpus run by
    /// <see cref="BareApicLoop"/> with the emulated backend's APIC options: the same exits as under
    /// lapic = emulated, handled without actors. Returns the milliseconds between the guest's marks.
    /// </summary>
    private static double RawPingPong(LongModeImage image)
    {
        using var vm = new RawVm(image, 16 << 20, cpus: 2, userSpaceApic: true);
        var marks = new Marks();
        new BareApicLoop(vm.Vcpus, marks, VmBuilder.EmulatedLapicOptions(vm.Vcpus[0], new MonotonicClock()))
            .Run(TimeSpan.FromMinutes(10), id => $"RIP={vm.Vcpus[id].GetRegisters().Rip:X}");
        return marks.Milliseconds(1, 2);
    }

    /// <summary>Runs the guest and returns the milliseconds between its two marks.</summary>
    private static async Task<double> Measure(LongModeImage image, int cpus, Variant variant) =>
        (await BenchGuest.RunAsync(new VmSpec($"bench-{variant.Mode.ToString().ToLowerInvariant()}", 16 << 20, cpus, image, variant.Mode),
            (_, _) => Task.FromResult(0), variant.Config)).Marks.Milliseconds(1, 2);

    private static void SetGate(Assembler a, byte vector, Label handler) => InterruptCode.SetGate(a, vector, handler);

    /// <summary>The handler: count, EOI, return.</summary>
    private static void CountingHandler(Assembler a, Label handler)
    {
        a.Label(ref handler);
        a.push(rdi);
        a.mov(rdi, (long)Counter);
        a.inc(__dword_ptr[rdi]);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.iretq();
    }

    /// <summary>Mark, then sleep (sti; hlt) until the counter reaches R12D; interrupts off after.</summary>
    private static void SleepUntilCounter(Assembler a)
    {
        var check = a.CreateLabel();
        var done = a.CreateLabel();
        a.mov(rdi, (long)Counter);
        a.Label(ref check);
        a.cmp(__dword_ptr[rdi], r12d);
        a.jae(done);
        a.sti();
        a.hlt();
        a.cli();
        a.jmp(check);
        a.Label(ref done);
    }

    /// <summary>vcpu 1 in real mode: IVT 0x41 → its handler, x2APIC on, ready; the handler EOIs and
    /// sends vector 0x40 to APIC 0 through the x2APIC ICR.</summary>
    private static byte[] Responder() => InterruptCode.ApTrampoline(Trampoline, 0x41,
        a => a.mov(__byte_ptr[ApReady], 1),
        a =>
        {
            a.push(eax);
            a.push(ecx);
            a.push(edx);
            InterruptCode.X2ApicEoi(a);
            a.mov(ecx, 0x830);             // ICR: fixed, vector 0x40, to APIC 0 (EDX)
            a.mov(eax, 0x40);
            a.wrmsr();
            a.pop(edx);
            a.pop(ecx);
            a.pop(eax);
            a.iret();
        });

    private static LongModeImage PingPong(int roundTrips)
    {
        var ap = Responder();
        return BenchGuest.Long(a =>
        {
            var pong = a.CreateLabel();
            var trampoline = a.CreateLabel();
            var ready = a.CreateLabel();
            var next = a.CreateLabel();
            SetGate(a, 0x40, pong);
            a.lea(rsi, __[trampoline]);
            a.mov(rdi, (long)Trampoline);
            a.mov(ecx, ap.Length);
            a.rep.movsb();
            InterruptCode.EnableLocalApic(a);
            a.mov(__dword_ptr[rbx + 0x310], 1 << 24);
            a.mov(__dword_ptr[rbx + 0x300], 0x4500);                            // INIT
            a.mov(__dword_ptr[rbx + 0x300], 0x4600 | (uint)(Trampoline >> 12)); // SIPI
            a.mov(rdi, (long)ApReady);
            a.Label(ref ready);
            a.pause();
            a.cmp(__byte_ptr[rdi], 1);
            a.jne(ready);
            a.xor(r12d, r12d);
            BenchGuest.Mark(a, 1);
            a.Label(ref next);
            a.mov(__dword_ptr[rbx + 0x310], 1 << 24);
            a.mov(__dword_ptr[rbx + 0x300], 0x41);                              // ping: fixed 0x41 to APIC 1
            a.inc(r12d);
            SleepUntilCounter(a);                                               // pong: 0x40 counted
            a.cmp(r12d, roundTrips);
            a.jb(next);
            BenchGuest.Mark(a, 2);
            BenchGuest.ExitOk(a);
            CountingHandler(a, pong);
            a.Label(ref trampoline);
            a.db(ap);
        });
    }

    private static LongModeImage Timer(int ticks, int periodMicroseconds) => BenchGuest.Long(a =>
    {
        var tick = a.CreateLabel();
        SetGate(a, 0x30, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + 0x3E0], 0xB);                       // divide by 1: 1 GHz
        a.mov(__dword_ptr[rbx + 0x320], 0x2_0030);                  // periodic, vector 0x30
        a.mov(r12d, ticks);
        BenchGuest.Mark(a, 1);
        a.mov(__dword_ptr[rbx + 0x380], periodMicroseconds * 1000); // initial count: starts the timer
        SleepUntilCounter(a);
        BenchGuest.Mark(a, 2);
        a.mov(__dword_ptr[rbx + 0x320], 0x1_0030);                  // masked
        BenchGuest.ExitOk(a);
        CountingHandler(a, tick);
    });
}
