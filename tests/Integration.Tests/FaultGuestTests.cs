using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>Faults injected into a VM while a real guest runs on KVM.</summary>
public sealed class FaultGuestTests
{
    private const ulong Code = 0x10_0000;
    private const int Bytes = 10_000;

    /// <summary>Prints byte i % 251 for i in 0..9999 through COM1, waiting for THR empty (LSR bit 5)
    /// before each byte as a driver does, then exits through debug-exit with status 1.</summary>
    private static LongModeImage Printer()
    {
        var a = new Assembler(64);
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
        a.cmp(ecx, Bytes);
        a.jb(next);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    [KvmFact]
    public async Task A_uart_crashed_while_the_guest_prints_10000_bytes_loses_none_and_doubles_none()
    {
        KvmRequirement.Check();
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(system, new VmSpec("printer", 16 << 20, 1, Printer())).WithStandardDevices(console).Start();
            await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(10)); // its devices exist now
            var uart = await system.ActorSelection(vm.Actor.Path / "uart0").ResolveOne(TimeSpan.FromSeconds(10));

            // Crash it twice in the middle of the output.
            foreach (var after in new[] { 2_000, 6_000 })
            {
                var deadline = DateTime.UtcNow.AddMinutes(5);
                while (console.BytesWritten < after && !vm.Ended.IsCompleted && DateTime.UtcNow < deadline) await Task.Delay(10);
                Assert.False(vm.Ended.IsCompleted, $"the guest ended before {after} bytes");
                uart.Tell(new FaultProtocol.Crash($"after {console.BytesWritten} bytes"));
            }

            var outcome = await vm.WaitAsync(TimeSpan.FromMinutes(10));
            Assert.Equal(VmProtocol.OutcomeKind.DebugExit, outcome.Kind);
            Assert.Equal(1, outcome.ExitCode);
            var expected = Enumerable.Range(0, Bytes).Select(i => (byte)(i % 251)).ToArray();
            Assert.Equal(expected, console.CapturedBytes());
            var health = await uart.Ask<DeviceProtocol.Health>(DeviceProtocol.GetHealth.Instance, TimeSpan.FromSeconds(10));
            Assert.Equal((2, 2), (health.Restarts, health.RestoredFromState));
        }
        finally
        {
            await system.Terminate();
        }
    }

    [KvmFact]
    public async Task A_crashed_vcpu_actor_stops_the_vm_with_a_report_naming_it()
    {
        KvmRequirement.Check();
        var a = new Assembler(64);
        var spin = a.CreateLabel();
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'R');
        a.@out(dx, al);
        a.Label(ref spin);
        a.jmp(spin);
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(system, new VmSpec("spinner", 16 << 20, 1,
                new LongModeImage(GuestCode.Assemble(a, Code), Code, Code))).WithStandardDevices(console).Start();
            await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(10));
            var vcpu = await system.ActorSelection(vm.Actor.Path / "vcpu-0").ResolveOne(TimeSpan.FromSeconds(10));
            var deadline = DateTime.UtcNow.AddMinutes(5);
            while (console.BytesWritten == 0 && DateTime.UtcNow < deadline) await Task.Delay(10); // it is spinning in the guest now

            vcpu.Tell(new FaultProtocol.Crash("test"));

            var outcome = await vm.WaitAsync(TimeSpan.FromMinutes(2));
            Assert.Equal(VmProtocol.OutcomeKind.VcpuError, outcome.Kind);
            Assert.Equal(VmProtocol.Outcome.VcpuErrorCode, outcome.ExitCode);
            Assert.Contains("vcpu-0 (vcpu 0) failed and was stopped", outcome.Detail);
            Assert.Contains("injected fault: test", outcome.Detail);
            Assert.Equal("R", console.CapturedText());
        }
        finally
        {
            await system.Terminate();
        }
    }
    /// <summary>The LAPIC timer, periodic every 2 ms (vector 0x30): each tick prints '.'; after
    /// <paramref name="ticks"/> ticks the guest exits through debug-exit with status 1.</summary>
    private static LongModeImage Ticker(int ticks)
    {
        const ulong counter = 0x9F900;
        var a = new Assembler(64);
        var tick = a.CreateLabel();
        var wait = a.CreateLabel();
        InterruptCode.SetGate(a, 0x30, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + InterruptCode.LapicTimerDivide], 0b1011);   // divide by 1
        a.mov(__dword_ptr[rbx + InterruptCode.LapicLvtTimer], 0x2_0030);    // periodic, vector 0x30
        a.mov(__dword_ptr[rbx + InterruptCode.LapicTimerInitial], 2_000_000); // 2 ms at 1 GHz
        a.mov(rsi, (long)counter);
        a.Label(ref wait);
        a.sti();
        a.hlt();
        a.cli();
        a.cmp(__dword_ptr[rsi], ticks);
        a.jb(wait);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref tick);
        a.push(rax);
        a.push(rdx);
        a.push(rdi);
        a.mov(rdi, (long)counter);
        a.inc(__dword_ptr[rdi]);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'.');
        a.@out(dx, al);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.pop(rdx);
        a.pop(rax);
        a.iretq();
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    [KvmFact]
    public async Task A_crashed_vlapic_restarts_with_its_state_and_the_guest_keeps_taking_its_timer_interrupts()
    {
        KvmRequirement.Check();
        const int ticks = 30;
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(system, new VmSpec("ticker", 16 << 20, 1, Ticker(ticks))).WithStandardDevices(console).Start();
            await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(10));
            var vlapic = await system.ActorSelection(vm.Actor.Path / "vlapic-0").ResolveOne(TimeSpan.FromSeconds(10));
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (console.BytesWritten < 5 && !vm.Ended.IsCompleted && DateTime.UtcNow < deadline) await Task.Delay(5);
            Assert.False(vm.Ended.IsCompleted, "the guest ended before the crash");

            vlapic.Tell(new FaultProtocol.Crash("test"));

            // Had the vlapic come back from reset, its timer would be masked and the guest would sleep forever.
            var outcome = await vm.WaitAsync(TimeSpan.FromMinutes(2));
            Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, outcome.ToString());
            var dots = console.CapturedText();
            Assert.True(dots.Length >= ticks && dots.All(c => c == '.'), $"serial: \"{dots}\"");
        }
        finally
        {
            await system.Terminate();
        }
    }

    [KvmFact]
    public async Task A_crashed_vmspace_stops_the_vm_with_a_report_naming_it()
    {
        KvmRequirement.Check();
        var a = new Assembler(64);
        var spin = a.CreateLabel();
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'R');
        a.@out(dx, al);
        a.Label(ref spin);
        a.jmp(spin);
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(system, new VmSpec("spinner", 16 << 20, 1,
                new LongModeImage(GuestCode.Assemble(a, Code), Code, Code))).WithStandardDevices(console).Start();
            await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(10));
            var vmspace = await system.ActorSelection(vm.Actor.Path / "vmspace").ResolveOne(TimeSpan.FromSeconds(10));
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (console.BytesWritten == 0 && DateTime.UtcNow < deadline) await Task.Delay(5);

            vmspace.Tell(new FaultProtocol.Crash("test"));

            var outcome = await vm.WaitAsync(TimeSpan.FromMinutes(2));
            Assert.Equal(VmProtocol.OutcomeKind.VcpuError, outcome.Kind);
            Assert.Contains("vmspace", outcome.Detail);
            Assert.Contains("injected fault: test", outcome.Detail);
        }
        finally
        {
            await system.Terminate();
        }
    }
}
