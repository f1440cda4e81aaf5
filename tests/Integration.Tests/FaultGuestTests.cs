using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>Faults injected into a VM while a real guest runs on KVM (the test library: GuestRun's
/// fault helpers, the same messages `actorvmm ctl fault` sends, and link fault plans).</summary>
public sealed class FaultGuestTests
{
    private const ulong Code = 0x10_0000;
    private const int Bytes = 10_000;
    private const ulong Counter = 0x9F900;

    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>Prints byte i % 251 for i in 0..<paramref name="bytes"/>-1 through COM1, waiting for THR
    /// empty (LSR bit 5) before each byte as a driver does, then exits through debug-exit with status 1.</summary>
    private static LongModeImage Printer(int bytes = Bytes) => Long(a =>
    {
        var next = a.CreateLabel();
        var wait = a.CreateLabel();
        a.xor(ecx, ecx);                 // i
        a.Label(ref next);
        a.mov(dx, 0x3FD);                // LSR
        a.Label(ref wait);
        a.@in(al, dx);
        a.test(al, 0x20);
        a.jz(wait);
        a.mov(eax, ecx);
        a.xor(edx, edx);
        a.mov(ebx, 251);
        a.div(ebx);                      // edx = i % 251
        a.mov(eax, edx);
        a.mov(dx, 0x3F8);
        a.@out(dx, al);
        a.inc(ecx);
        a.cmp(ecx, bytes);
        a.jb(next);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
    });

    private static byte[] Expected(int bytes) => Enumerable.Range(0, bytes).Select(i => (byte)(i % 251)).ToArray();

    /// <summary>Prints 'R', then spins.</summary>
    private static LongModeImage Spinner() => Long(a =>
    {
        var spin = a.CreateLabel();
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'R');
        a.@out(dx, al);
        a.Label(ref spin);
        a.jmp(spin);
    });

    /// <summary>The LAPIC timer, periodic every 2 ms (vector 0x30): each tick prints '.'; after
    /// <paramref name="ticks"/> ticks the guest exits through debug-exit with status 1.</summary>
    private static LongModeImage Ticker(int ticks) => Long(a =>
    {
        var tick = a.CreateLabel();
        var wait = a.CreateLabel();
        InterruptCode.SetGate(a, 0x30, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0b1011);     // divide by 1
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x2_0030);      // periodic, vector 0x30
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], 2_000_000); // 2 ms at 1 GHz
        var hlt = a.CreateLabel();
        a.mov(rsi, (long)Counter);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__dword_ptr[rsi], ticks);
        a.jb(wait);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref tick);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt);
        a.push(rax);
        a.push(rdx);
        a.push(rdi);
        a.mov(rdi, (long)Counter);
        a.inc(__dword_ptr[rdi]);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'.');
        a.@out(dx, al);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.pop(rdx);
        a.pop(rax);
        a.iretq();
    });

    /// <summary>Sends itself <paramref name="count"/> IPIs (vector 0x42), one at a time, each after the
    /// previous one was handled; then waits with interrupts on for a late duplicate and exits with
    /// status 1 if the handler ran exactly <paramref name="count"/> times, else status 2.</summary>
    private static LongModeImage SelfIpis(int count) => Long(a =>
    {
        var handler = a.CreateLabel();
        var next = a.CreateLabel();
        var wait = a.CreateLabel();
        var linger = a.CreateLabel();
        var bad = a.CreateLabel();
        var hlt = a.CreateLabel();
        InterruptCode.SetGate(a, 0x42, handler);
        InterruptCode.EnableLocalApic(a);
        a.mov(rsi, (long)Counter);
        a.xor(r12d, r12d);
        a.Label(ref next);
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4_0042);       // fixed, vector 0x42, to self
        a.inc(r12d);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__dword_ptr[rsi], r12d);
        a.jb(wait);
        a.cmp(r12d, count);
        a.jb(next);
        a.mov(ecx, 20_000);                                                  // ~20 ms with interrupts on
        a.sti();
        a.Label(ref linger);
        a.pause();
        a.dec(ecx);
        a.jnz(linger);
        a.cli();
        a.cmp(__dword_ptr[rsi], count);
        a.jne(bad);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref bad);
        a.mov(al, 1);
        a.@out(0xF4, al);
        a.Label(ref handler);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt);
        a.push(rdi);
        a.mov(rdi, (long)Counter);
        a.inc(__dword_ptr[rdi]);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.iretq();
    });

    [KvmFact]
    public async Task A_uart_crashed_while_the_guest_prints_10000_bytes_loses_none_and_doubles_none()
    {
        await using var run = await GuestRun.StartAsync(Printer());
        foreach (var after in new[] { 2_000, 6_000 }) // crash it twice in the middle of the output
        {
            Assert.True(await run.WaitForSerialAsync(after), $"the guest ended or stalled before {after} bytes");
            await run.CrashAsync("uart0", $"after {run.SerialBytes} bytes");
        }

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(10));
        Assert.Equal((VmProtocol.OutcomeKind.DebugExit, 1), (outcome.Kind, outcome.ExitCode));
        Assert.Equal(Expected(Bytes), run.SerialBytesWritten);
        var uart = await run.ResolveChild("uart0");
        var health = await uart.Ask<DeviceProtocol.Health>(DeviceProtocol.GetHealth.Instance, TimeSpan.FromSeconds(10));
        Assert.Equal((2, 2), (health.Restarts, health.RestoredFromState));
    }

    [KvmFact]
    public async Task A_crashed_vcpu_actor_stops_the_vm_with_a_report_naming_it()
    {
        await using var run = await GuestRun.StartAsync(Spinner());
        Assert.True(await run.WaitForSerialAsync(1)); // it is spinning in the guest now

        await run.CrashAsync("vcpu-0");

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));
        Assert.Equal(VmProtocol.OutcomeKind.VcpuError, outcome.Kind);
        Assert.Equal(VmProtocol.Outcome.VcpuErrorCode, outcome.ExitCode);
        Assert.Contains("vcpu-0 (vcpu 0) failed and was stopped", outcome.Detail);
        Assert.Contains("injected fault: test", outcome.Detail);
        Assert.Equal("R", run.Serial);
    }

    [KvmFact]
    public async Task A_crashed_vlapic_restarts_with_its_state_and_the_guest_keeps_taking_its_timer_interrupts()
    {
        const int ticks = 30;
        await using var run = await GuestRun.StartAsync(Ticker(ticks));
        Assert.True(await run.WaitForSerialAsync(5), "the guest took no timer interrupts");

        await run.CrashAsync("vlapic-0");

        // Had the vlapic come back from reset, its timer would be masked and the guest would sleep forever.
        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, outcome.ToString());
        var dots = run.Serial;
        Assert.True(dots.Length >= ticks && dots.All(c => c == '.'), $"serial: \"{dots}\"");
        // The supervision event is in the trace, from the failed actor to its VM.
        var restarted = Assert.Single(run.Trace.Snapshot(), e => e.Message is VmProtocol.ChildRestarted);
        Assert.Equal(("vlapic-0", "vm-guest"), (restarted.Sender, restarted.Receiver));
        Assert.Contains("injected fault: test", ((VmProtocol.ChildRestarted)restarted.Message).Cause);
        Assert.Equal(["vlapic-0: InjectedFaultException: injected fault: test"], (await run.StatusAsync()).Restarts);
    }

    [KvmFact]
    public async Task A_crashed_vmspace_stops_the_vm_with_a_report_naming_it()
    {
        await using var run = await GuestRun.StartAsync(Spinner());
        Assert.True(await run.WaitForSerialAsync(1));

        await run.CrashAsync("vmspace");

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));
        Assert.Equal(VmProtocol.OutcomeKind.VcpuError, outcome.Kind);
        Assert.Contains("vmspace", outcome.Detail);
        Assert.Contains("injected fault: test", outcome.Detail);
    }

    [KvmFact]
    public async Task A_delayed_vlapic_to_vcpu_link_still_delivers_every_interrupt_once()
    {
        const int count = 20;
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault("vlapic-0", "vcpu-0", "*", LinkFaultKind.Delay, TimeSpan.FromMilliseconds(3)));
        await using var run = await GuestRun.StartAsync(SelfIpis(count), linkFaults: plan);

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));

        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status 3: an interrupt came twice or not at all)");
        Assert.True(plan.Delayed >= count, $"only {plan.Delayed} messages were delayed");
        Assert.Equal((ulong)count, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Counter)) & 0xFFFF_FFFF);
    }

    [KvmTheory]
    [InlineData("vlapic-0", "vcpu-0")] // every InterruptPending twice
    [InlineData("vcpu-0", "vlapic-0")] // every InterruptAccepted, APIC register write and read twice
    public async Task Duplicated_messages_between_vcpu_and_vlapic_still_deliver_every_interrupt_once(string from, string to)
    {
        const int count = 20;
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault(from, to, "*", LinkFaultKind.Duplicate));
        await using var run = await GuestRun.StartAsync(SelfIpis(count), linkFaults: plan);

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));

        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status 3: an interrupt came twice or not at all)");
        Assert.True(plan.Duplicated >= count, $"only {plan.Duplicated} messages were duplicated");
    }

    [KvmFact]
    public async Task A_stalled_vcpu_runs_no_guest_code_meanwhile_and_goes_on_after_losing_nothing()
    {
        const int bytes = 3_000;
        await using var run = await GuestRun.StartAsync(Printer(bytes));
        Assert.True(await run.WaitForSerialAsync(500));

        var (started, ended) = await run.StallStartedAsync("vcpu-0", TimeSpan.FromMilliseconds(600));
        Assert.Contains("vcpu 0 stalled", await ended);
        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(5));
        Assert.Equal((VmProtocol.OutcomeKind.DebugExit, 1), (outcome.Kind, outcome.ExitCode));
        Assert.Equal(Expected(bytes), run.SerialBytesWritten);

        // The vcpu's own messages (its LSR reads and THR writes, recorded by its thread as it sends
        // them) stop while its thread is stopped, and go on after: no guest instruction ran meanwhile.
        var from = run.Trace.Nanoseconds(started.Timestamp);
        var to = from + (long)started.Duration.TotalNanoseconds;
        var sent = run.Trace.Snapshot().Where(e => e is { Sender: "vcpu-0", Receiver: "uart0" }).Select(e => e.Nanoseconds).ToList();
        Assert.True(sent.Any(t => t < from),
            $"no vcpu-0 → uart0 message before the stall began at {from} ns (it ended at {to} ns); {sent.Count} such messages, " +
            $"the first at [{string.Join(", ", sent.Take(5))}] ns; the trace's first events: " +
            string.Join("; ", run.Trace.Snapshot().Take(5).Select(e => $"{e.Nanoseconds} {e.Sender}→{e.Receiver} {e.Type}")));
        Assert.DoesNotContain(sent, t => t > from && t < to);
        Assert.Contains(sent, t => t >= to);
    }

    [KvmFact]
    public async Task A_failed_nested_page_fault_stops_the_vm_with_a_report_naming_its_gpa()
    {
        const ulong page = 0x40_0000;
        const ushort gatePort = 0x510;
        var image = Long(a =>
        {
            var wait = a.CreateLabel();
            a.mov(dx, gatePort);
            a.Label(ref wait);
            a.@in(al, dx);                   // 0 until the host has armed the failure and released it
            a.test(al, al);
            a.jz(wait);
            a.mov(rdi, (long)page);
            a.mov(__qword_ptr[rdi], 0x55);  // a fresh page: a nested page fault, armed to fail
            a.mov(al, 0);
            a.@out(0xF4, al);
        });
        var gate = new HostGate();
        await using var run = await GuestRun.StartAsync(image, paging: VmspaceOptions.Paged(),
            devices: new DeviceSpec("gate", DeviceProtocol.Space.Port, gatePort, 1, _ => gate));
        await run.FailNestedPageFaultsAsync(1, page);
        gate.Release(1);

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(2));

        Assert.Equal(VmProtocol.OutcomeKind.VcpuError, outcome.Kind);
        Assert.Contains("vmspace failed", outcome.Detail);
        Assert.Contains("0x400000", outcome.Detail);
    }
}
