using System.Text;
using ActorVmm.Host.Boot;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Host.Guests;

/// <summary>
/// The built-in guest of `actorvmm demo`: 64-bit code (the VMM builds its page tables) that prints
/// a greeting on COM1 the way a driver does — poll LSR until THRE, then write THR — and then
/// halts with interrupts disabled, which ends the VM with exit code 0.
/// </summary>
public static class DemoGuest
{
    public const ulong LoadAddress = 0x10_0000;
    public const string Greeting = "Hello from an ActorVmm guest!\n";

    public static LongModeImage Build(string greeting = Greeting)
    {
        var a = new Assembler(64);
        var message = a.CreateLabel();
        var next = a.CreateLabel();
        var wait = a.CreateLabel();
        var done = a.CreateLabel();

        a.lea(rsi, __[message]);
        a.Label(ref next);
        a.mov(bl, __byte_ptr[rsi]);
        a.test(bl, bl);
        a.jz(done);
        a.Label(ref wait);
        a.mov(dx, 0x3FD);          // LSR
        a.@in(al, dx);
        a.test(al, 0x20);          // THRE
        a.jz(wait);
        a.mov(dx, 0x3F8);          // THR
        a.mov(al, bl);
        a.@out(dx, al);
        a.inc(rsi);
        a.jmp(next);
        a.Label(ref done);
        a.cli();
        a.hlt();
        a.Label(ref message);
        a.db([.. Encoding.ASCII.GetBytes(greeting), 0]);

        return new LongModeImage(GuestCode.Assemble(a, LoadAddress), LoadAddress, LoadAddress);
    }
}
